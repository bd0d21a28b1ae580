"""The decoder: embeddings, a scanned stack of identical blocks, final norm, LM head.

Axis letters: see `sparcom_jax.axes`.

Blocks are created with `nnx.vmap` (every parameter gains a leading L axis)
and run with `nnx.scan`, so compile time does not grow with depth. Counting is
an explicit, config-gated output of each block (reduced over T inside the
block); the scan stacks it to [L, B, ...], never [B, T, L, F].
"""

from __future__ import annotations

import functools
import weakref
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparcom_jax.models.config import ModelConfig
from sparcom_jax.models.dispatch import Dispatch, dispatch_for
from sparcom_jax.models.layers import (Attention, GatedFFN, RMSNorm, attention_context, nonfinite_rows,
                                      precision_of, rotary_tables)
from sparcom_jax.models.moe import MoEFFN
from sparcom_jax.models.params import ParamDecl, create, linear, same

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def resolve_dtype(dtype) -> Any:
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r} is not supported; use one of {sorted(DTYPES)}")
        return DTYPES[dtype]
    return dtype


class Block(nnx.Module):
    """Pre-norm decoder block: x + attn(norm(x)), then x + ffn(norm(x))."""

    CHILDREN = {"input_norm": ("input_layernorm", RMSNorm), "attn": ("self_attn", Attention),
                "post_attn_norm": ("post_attention_layernorm", RMSNorm), "ffn": ("mlp", GatedFFN, MoEFFN)}

    def __init__(self, cfg: ModelConfig, dispatch: Dispatch, *, rngs: nnx.Rngs, dtype, param_dtype, gate_dtype=None):
        D = cfg.hidden_size
        self.input_norm = RMSNorm(D, cfg.rms_norm_eps, param_dtype=param_dtype)
        self.attn = Attention(cfg, dispatch, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.post_attn_norm = RMSNorm(D, cfg.rms_norm_eps, param_dtype=param_dtype)
        if cfg.is_moe:
            self.ffn = MoEFFN(cfg, dispatch, rngs=rngs, dtype=dtype, param_dtype=param_dtype, gate_dtype=gate_dtype)
        else:
            self.ffn = GatedFFN(D, cfg.intermediate_size, cfg.hidden_act, rngs=rngs, dtype=dtype,
                                param_dtype=param_dtype, gate_dtype=gate_dtype)
        self.is_moe = cfg.is_moe

    def __call__(self, x_BTD, cos, sin, mask, valid_BT, count_mask_BT, ablate, out_needed=None, sums=False):
        """One block; returns (x [B, T, D], stats dict or None).

        `mask`: the attention's (`attention_context`). `valid_BT`: real tokens (the MoE
        expert loop skips padding). `out_needed` (traced bool, or None for True): False
        skips the FFN's output (the up and down products) when only this block's counts
        are wanted. `sums`: also the activation sums.
        """
        x_BTD = x_BTD + self.attn(self.input_norm(x_BTD), cos, sin, mask)
        h = self.post_attn_norm(x_BTD)
        if self.is_moe:
            y, stats = self.ffn(h, valid_BT, count_mask_BT, ablate, out_needed, sums)
        else:
            y, stats = self.ffn(h, valid_BT, count_mask_BT, (ablate or {}).get("neuron_keep"), out_needed, sums)
        x_BTD = x_BTD + y
        if count_mask_BT is not None:
            # Besides the FFN activations, the block output: a NaN from this block's
            # attention or down products shows here, not one layer later.
            stats["nonfinite"] = stats["nonfinite"] | nonfinite_rows(x_BTD, valid_BT)
        return x_BTD, stats


# Host-side companions of a model (its tokenizer, the directory it came from). Kept
# outside the module so they are not part of its graphdef: two checkpoints of one
# architecture then share every compiled function.
_COMPANIONS: "weakref.WeakKeyDictionary[CausalLM, dict]" = weakref.WeakKeyDictionary()


def _companion(name: str, doc: str):
    def get(self):
        return _COMPANIONS.get(self, {}).get(name)

    def put(self, value):
        _COMPANIONS.setdefault(self, {})[name] = value

    return property(get, put, doc=doc)


class ModelOutput(NamedTuple):
    logits: Any  # float32 [B, T, V] or None
    hidden: Any  # final normed hidden states [B, T, D]
    stats: Any  # dict of arrays [B, L, ...] or None (counts, sums, "nonfinite" bool [B, L])


class CausalLM(nnx.Module):
    """A causal language model of any supported family.

    Call it like a Hugging Face model: ``model(input_ids [B, T], attention_mask [B, T])``
    returns float32 logits [B, T, V]. Right padding; mask 1 marks real tokens.

    Args:
      cfg: the architecture.
      rngs: initialisation randomness (weights are replaced when loading).
      dtype: compute dtype; param_dtype: storage dtype (default: dtype).
      gate_dtype: None (default: the compute dtype), or "float32" in a bfloat16/float16
        model: every gate projection (dense FFN, shared expert, routed experts), whose
        sign is what is counted, computes in float32 from float32 casts of its input and
        weights; the rest stays in `dtype`. Shown in the repr as the effective dtype
        (``model.gate_dtype``) and recorded in the count store. bfloat16 products already
        accumulate in float32 on CPUs, GPUs and TPUs, so with weights stored in bfloat16
        the float32 gate has the bfloat16 gate's sign (it differs by the output's
        rounding, which later layers see); it recovers float32 counts that bfloat16
        rounding of the gate weights flipped only with ``param_dtype="float32"``.
      moe_impl: a `Dispatch`, or the MoE strategy for `Dispatch.choose`: "auto" (on GPU
        the capacity-buffer batched matmul, on TPU ragged_dot, on CPU an expert loop
        when counting, else a differentiable tile scan), "capacity", "ragged", "grouped"
        (tokamax's grouped matmul when installed), "tiled" or "looped" (inference only);
        all give the same result. Resolved here, once,
        with the attention kernel for this dtype and backend (cuDNN on GPU in bfloat16,
        else the blocked attention): ``model.dispatch`` (shown in the repr) says what runs.
    """

    PARAMS = {"embed": ParamDecl(("vocab", "embed"), (same("model.embed_tokens.weight", 2),)),
              "lm_head": ParamDecl(("embed", "vocab"), (linear("lm_head.weight"),))}
    CHILDREN = {"blocks": ("model.layers.{l}", Block), "final_norm": ("model.norm", RMSNorm)}

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs | None = None, dtype="float32",
                 param_dtype=None, moe_impl: str | Dispatch = "auto", gate_dtype=None):
        rngs = rngs or nnx.Rngs(0)
        dtype = resolve_dtype(dtype)
        param_dtype = resolve_dtype(param_dtype) if param_dtype is not None else dtype
        gate = resolve_dtype(gate_dtype) if gate_dtype is not None else dtype
        if jnp.dtype(gate) not in (jnp.dtype(dtype), jnp.dtype(jnp.float32)):
            raise ValueError(f"gate_dtype {jnp.dtype(gate).name!r} must be 'float32' or the compute dtype "
                             f"{jnp.dtype(dtype).name!r}")
        dispatch = dispatch_for(moe_impl, dtype, cfg.head_dim)
        self.config = cfg
        self.dtype = dtype
        self.gate_dtype = jnp.dtype(gate).name
        layer_gate = None if jnp.dtype(gate) == jnp.dtype(dtype) else gate
        self.precision = precision_of(dtype)
        self.dispatch = dispatch
        sizes = {"vocab": cfg.vocab_size, "embed": cfg.hidden_size}
        create(self, ["embed"], rngs, sizes, param_dtype)

        @nnx.split_rngs(splits=cfg.num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_blocks(r):
            return Block(cfg, dispatch, rngs=r, dtype=dtype, param_dtype=param_dtype, gate_dtype=layer_gate)

        self.blocks = make_blocks(rngs)
        self.final_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype)
        if not cfg.tie_word_embeddings:
            create(self, ["lm_head"], rngs, sizes, param_dtype)

    tokenizer = _companion("tokenizer", "The checkpoint directory's tokenizer (or None); not part of the graph.")
    source_path = _companion("source_path", "The directory the weights came from (or None); not part of the graph.")

    def __repr__(self) -> str:
        # What a notebook cell shows: the architecture's counted widths and how the model runs,
        # not flax's tree of every weight (about 100 lines, the config on one line near the end).
        cfg = self.config
        params = jax.tree.leaves(nnx.state(self, nnx.Param))
        n = sum(int(np.prod(x.shape)) for x in params)
        lines = [f"CausalLM {cfg.model_type}: {cfg.num_layers} layers, hidden {cfg.hidden_size}, vocab "
                 f"{cfg.vocab_size:,}; {n:,} parameters ({jnp.dtype(params[0].dtype).name})"]
        if cfg.is_moe:
            norm = "renormalised" if cfg.norm_topk_prob else "not renormalised"
            lines.append(f"  experts           {cfg.num_experts} per layer, top-{cfg.top_k} ({norm}), "
                         f"{cfg.moe_intermediate_size:,} neurons each")
        if cfg.neuron_width:
            what = "shared expert" if cfg.is_moe else "FFN"
            lines.append(f"  {what:<17} {cfg.neuron_width:,} neurons per layer ({cfg.hidden_act})")
        runs = f"compute {jnp.dtype(self.dtype).name}, gate {self.gate_dtype}; attention {self.dispatch.attention}"
        lines.append(f"  runs              {runs} on {self.dispatch.backend}"
                     + (f"; {self.moe_dispatch}" if cfg.is_moe else ""))
        if self.source_path:
            tok = "its tokenizer" if self.tokenizer is not None else "no tokenizer (pass tokenizer= to collect)"
            source = f"{self.source_path}; {tok}"
        else:  # resolve_tokenizer falls back to the shipped tokenizer only for such a model
            weights = "random weights" if isinstance(params[0], jax.Array) else "abstract, no weights"
            source = f"no directory ({weights}); the shipped tokenizer"
        lines.append(f"  from              {source}")
        lines.append("  every weight: nnx.display(model); the architecture: model.config")
        return "\n".join(lines)

    __str__ = __repr__  # flax's Object prints its tree for str() too

    @property
    def moe_dispatch(self) -> str | None:
        """What the MoE layers run (strategy and count reducer, see `Dispatch`); None for dense models."""
        return str(self.dispatch) if self.config.is_moe else None

    def forward(self, input_ids, attention_mask=None, *, count_mask=None, ablate=None,
                with_logits: bool = True, with_hidden: bool = True, sums: bool = False) -> ModelOutput:
        """Full forward with optional in-graph counting and ablation.

        Args:
          input_ids: int [B, T].
          attention_mask: 0/1 or bool [B, T]; None means all tokens are real.
          count_mask: bool [B, T] tokens to count (already restricted to real tokens
            by the caller or here); None switches counting off.
          ablate: optional dict of arrays with a leading L axis: "neuron_keep" [L, F]
            (dense FFN or shared expert), "expert_drop" bool [L, E] with
            "expert_drop_pre" bool [L] (see `sparcom_jax.models.moe.route`),
            "expert_neuron_keep" [L, E, G]. Dropping experts adds "router_probs"
            float32 [B, L, T, E] to the stats (every expert's softmax probability).
          with_logits: skip the LM head when only counts are wanted.
          with_hidden: False (with `with_logits=False`) when only the counts are
            wanted: `hidden` is then None and, where `Dispatch.skip_dead_ffn` (CPU), the
            last block's up and down products (which feed nothing) are skipped.
          sums: with `count_mask`, the stats also hold the float32 sums beside the
            counts (``neuron_act_sum``, ``expert_weight_sum``, ``expert_neuron_act_sum``).

        With float32 compute every product runs in full float32 on every backend, and
        bfloat16 compute keeps the backend's default (see `precision_of`).
        """
        cfg = self.config
        B, T = input_ids.shape
        valid = (jnp.ones((B, T), bool) if attention_mask is None else attention_mask.astype(bool))
        if count_mask is not None:
            count_mask = count_mask.astype(bool) & valid
        x = self.embed[...].astype(self.dtype)[input_ids]
        cos, sin = rotary_tables(cfg, T)
        mask = attention_context(valid, cfg.sliding_window, self.dispatch.attention)

        # Counts only: the last block's FFN output is dead, so skip its up/down products.
        skip_last = not (with_logits or with_hidden) and self.dispatch.skip_dead_ffn
        out_needed = jnp.arange(cfg.num_layers) < cfg.num_layers - 1 if skip_last else None

        @nnx.scan(in_axes=(0, nnx.Carry, 0 if ablate is not None else None, 0 if out_needed is not None else None),
                  out_axes=(nnx.Carry, 0))
        def run(block, x, abl, need):
            return block(x, cos, sin, mask, valid, count_mask, abl, need, sums)

        x, stats = run(self.blocks, x, ablate, out_needed)
        h = self.final_norm(x) if with_logits or with_hidden else None
        logits = None
        if with_logits:
            w = self.embed[...].T if cfg.tie_word_embeddings else self.lm_head[...]
            logits = jnp.einsum("BTD,DV->BTV", h, w.astype(self.dtype), precision=self.precision).astype(jnp.float32)
        if stats is not None:
            stats = {k: jnp.moveaxis(v, 0, 1) for k, v in stats.items()}  # [L, B, ...] -> [B, L, ...]
        return ModelOutput(logits, h, stats)

    def __call__(self, input_ids, attention_mask=None):
        ids = jnp.asarray(input_ids)
        am = None if attention_mask is None else jnp.asarray(attention_mask)
        return jitted_logits(nnx.graphdef(self), nnx.state(self), ids, am)


@functools.partial(jax.jit, static_argnums=0)
def jitted_logits(graphdef, state, input_ids, attention_mask):
    return nnx.merge(graphdef, state).forward(input_ids, attention_mask).logits


def init_model(cfg: ModelConfig, *, seed: int = 0, dtype="float32", param_dtype=None,
               moe_impl: str | Dispatch = "auto", gate_dtype=None, mesh=None, rules: dict | None = None) -> CausalLM:
    """A randomly initialised model (normal(0, 0.02) weights, unit norms, zero biases).

    Every parameter is created on the device directly in `param_dtype` by one compiled
    program, and with `mesh` directly in its shards (the sharding rules applied to the
    declared logical axes), so the device holds the weights plus at most one layer's
    float32 sample of one parameter (`sparcom_jax.models.params.normal_sampler`) while
    it runs. The values depend only on `seed` (not on the mesh) and equal those of
    constructing ``CausalLM(cfg, rngs=nnx.Rngs(seed), ...)`` directly.

    Args:
      cfg: the architecture.
      seed: the random seed.
      dtype, param_dtype, moe_impl, gate_dtype: as for `CausalLM`.
      mesh: optional ("data", "model") `jax.sharding.Mesh`; None: the default device.
      rules: logical-axis rules (default `sparcom_jax.parallel.sharding.ANALYSIS_RULES`).
    """
    dispatch = dispatch_for(moe_impl, resolve_dtype(dtype), cfg.head_dim)
    rule_items = None if rules is None else tuple(sorted(rules.items()))
    graphdef, program = _init_program(cfg, dtype, param_dtype, dispatch, gate_dtype, mesh, rule_items)
    return nnx.merge(graphdef, program(jax.random.key(seed)))


@functools.lru_cache(maxsize=32)
def _init_program(cfg, dtype, param_dtype, dispatch, gate_dtype, mesh, rule_items):
    """(graphdef, jitted key -> state) of `init_model`, built once per architecture and placement."""
    from sparcom_jax.parallel.sharding import state_shardings

    def make(key):
        return CausalLM(cfg, rngs=nnx.Rngs(key), dtype=dtype, param_dtype=param_dtype, moe_impl=dispatch,
                        gate_dtype=gate_dtype)

    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: make(jax.random.key(0))))
    shardings = None if mesh is None else state_shardings(abstract, mesh, None if rule_items is None
                                                          else dict(rule_items))
    return graphdef, jax.jit(lambda key: nnx.state(make(key)), out_shardings=shardings)


def abstract_model(cfg: ModelConfig, dtype="float32", param_dtype=None,
                   moe_impl: str | Dispatch = "auto", gate_dtype=None) -> CausalLM:
    """The model with ShapeDtypeStruct leaves (`jax.eval_shape`): no memory, no compute."""
    return nnx.eval_shape(lambda: CausalLM(cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype,
                                           moe_impl=moe_impl, gate_dtype=gate_dtype))


def param_count(model: CausalLM) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
