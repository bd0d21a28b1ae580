"""Building blocks shared by every family: norms, rotary embeddings, attention, gated FFN.

Axis letters: see `sparcom_jax.axes`.

Each layer takes only the config fields it needs. Layers hold ``nnx.Param``
values in ``param_dtype`` and compute in ``dtype``; norms and softmax run in
float32 as in the reference implementation. Every product carries the model's
precision explicitly (`precision_of`), so a direct call computes as the model does;
the one exception is `jax.nn.dot_product_attention` (`attend_fused`), which takes no
precision and is therefore never chosen for float32 compute off the CPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from sparcom_jax.models.config import ModelConfig, rope_inv_freq
from sparcom_jax.models.params import HFLayout, ParamDecl, bias, create, linear, norm_scale


def activation(name: str):
    """The FFN activation `act` of METHOD.md by its Hugging Face name."""
    if name in ("silu", "swish"):
        return jax.nn.silu
    if name == "gelu":
        return lambda x: jax.nn.gelu(x, approximate=False)
    if name in ("gelu_new", "gelu_pytorch_tanh"):
        return lambda x: jax.nn.gelu(x, approximate=True)
    if name == "relu":
        return jax.nn.relu
    raise ValueError(f"unsupported activation {name!r}")


def precision_of(dtype) -> jax.lax.Precision:
    """The precision every product of a model computing in `dtype` carries.

    HIGHEST for float32: full float32 on every backend (GPUs would otherwise use TF32
    and TPUs bfloat16 passes, moving counts near the sign boundary away from the
    float32 reference); DEFAULT (the backend's own) for bfloat16 and float16.
    """
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else jax.lax.Precision.DEFAULT


def expert_mlp(x, wg, wu, wd, *, act, dot, keep=None, with_out: bool = True, gate_dtype=None):
    """The gated FFN body, down(act(gate(x)) * up(x)), on rows of one expert or a dense FFN.

    Every dense FFN, shared expert and MoE dispatch strategy runs this one body.

    Args:
      x: rows [..., D]; wg, wu: [..., D, G]; wd: [..., G, D] (leading axes broadcast
        as `dot` broadcasts them).
      act: the activation; dot: the product (`jnp.matmul` or a grouped `ragged_dot`,
        with the model's precision; it takes a ``precision`` keyword overriding it).
      keep: optional float mask broadcasting against the activations (1 keep, 0 off).
      with_out: False computes only the gate product (counts-only work).
      gate_dtype: None (the gate in x's dtype), or the dtype of the gate product: from
        x cast to it and `wg` (already in it), at that dtype's precision; the rest stays
        in x's dtype, the activations joining it after `act`.

    Returns:
      (y [..., D] or None without `with_out`, A [..., G]): the output and the
      activations before `keep` (what is counted), in `gate_dtype` when given.
    """
    if gate_dtype is None:
        a = act(dot(x, wg))
    else:
        a = act(dot(x.astype(gate_dtype), wg, precision=precision_of(gate_dtype)))
    if not with_out:
        return None, a
    h = a if keep is None else a * keep
    return dot(h.astype(x.dtype) * dot(x, wu), wd), a


def rms_norm(x, weight, eps: float, axis=-1):
    """RMSNorm as transformers computes it: normalise in float32, cast back, then scale.

    `axis` may name several axes (OLMoE normalises a whole projection spread over
    heads); `weight` must then already broadcast against `x`.
    """
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=axis, keepdims=True) + eps)
    return weight.astype(x.dtype) * x32.astype(x.dtype)


class RMSNorm(nnx.Module):
    PARAMS = {"weight": norm_scale("weight")}

    def __init__(self, width: int, eps: float, *, param_dtype=jnp.float32):
        create(self, ["weight"], None, {"norm": width}, param_dtype)
        self.eps = eps

    def __call__(self, x):
        return rms_norm(x, self.weight[...], self.eps)


def rotary_tables(cfg: ModelConfig, T: int):
    """cos, sin tables [T, Dh] (float32) for positions 0..T-1 (right padding)."""
    inv = jnp.asarray(rope_inv_freq(cfg))
    pos = jnp.arange(T, dtype=jnp.float32)
    if cfg.rope_type == "linear":
        pos = pos / cfg.rope_factor
    freqs = pos[:, None] * inv[None, :]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rotary(x_BHTd, cos_Td, sin_Td):
    """Rotate-half RoPE (transformers' convention) on heads-major [B, H, T, Dh] inputs."""
    half = x_BHTd.shape[-1] // 2
    rot = jnp.concatenate([-x_BHTd[..., half:], x_BHTd[..., :half]], axis=-1)
    out = x_BHTd.astype(jnp.float32) * cos_Td + rot.astype(jnp.float32) * sin_Td
    return out.astype(x_BHTd.dtype)


def attention_bias(valid_BT, sliding_window: int | None):
    """Additive float32 bias [B, 1, T, T]: 0 where a query may attend, -1e30 elsewhere.

    Causal, keys must be real tokens, optional sliding window. Built once per
    forward and shared by every layer.
    """
    T = valid_BT.shape[1]
    q = jnp.arange(T)[:, None]
    k = jnp.arange(T)[None, :]
    allowed = k <= q
    if sliding_window:
        allowed = allowed & (q - k < sliding_window)
    allowed = allowed[None, None] & valid_BT[:, None, None, :]
    return jnp.where(allowed, 0.0, -1e30).astype(jnp.float32)


def attend(q_BHTd, k_BKTd, v_BKTd, bias_B1TT, *, block: int, max_blocks: int, precision=None):
    """Causal softmax attention with grouped kv heads, in query blocks of about `block` rows.

    Query block [a, b) meets only keys [0, b): the keys after b are masked for every
    query in it, so leaving them out changes no softmax (their weight is exactly 0);
    most of the masked upper triangle is never computed. At most `max_blocks` blocks.
    `precision` defaults to `precision_of` the inputs' dtype.
    """
    precision = precision_of(q_BHTd.dtype) if precision is None else precision
    T = q_BHTd.shape[2]
    n = min(max_blocks, max(1, -(-T // block)))
    edges = [round(i * T / n) for i in range(n + 1)]
    return jnp.concatenate([_attend(q_BHTd[:, :, a:b], k_BKTd[:, :, :b], v_BKTd[:, :, :b], bias_B1TT[:, :, a:b, :b],
                                    precision) for a, b in zip(edges[:-1], edges[1:])], axis=2)


def _attend(q_BHTd, k_BKSd, v_BKSd, bias_B1TS, precision):
    """Softmax attention with grouped kv heads; normalisation deferred past the PV product.

    Heads-major layouts ([B, H, T, Dh]) make both products plain batched matmuls
    (no transposes), and dividing the [B, H, T, Dh] output by the row sums, instead
    of normalising the [B, H, T, S] probabilities, saves a pass over the score
    tensor; the result is the same softmax. Scores and the softmax run in float32.
    """
    B, H, T, d = q_BHTd.shape
    K = k_BKSd.shape[1]
    q = q_BHTd.reshape(B, K, H // K, T, d)
    s = jnp.einsum("BKRTd,BKSd->BKRTS", q, k_BKSd, preferred_element_type=jnp.float32,
                   precision=precision) * (d ** -0.5)
    s = s + bias_B1TS[:, :, None]
    p = jnp.exp(s - jnp.max(s, axis=-1, keepdims=True))
    o = jnp.einsum("BKRTS,BKSd->BKRTd", p.astype(v_BKSd.dtype), v_BKSd, preferred_element_type=jnp.float32,
                   precision=precision)
    o = o / jnp.sum(p, axis=-1)[..., None]
    return o.reshape(B, H, T, d).astype(q_BHTd.dtype)


def attend_fused(q_BHTd, k_BKTd, v_BKTd, lengths_B, *, window: int | None, implementation: str):
    """Causal attention through `jax.nn.dot_product_attention` ("cudnn" or "xla"): [B, T, H, Dh].

    Our masking in its terms: causal (`is_causal`), right padding as per-row lengths
    (keys and queries past a row's length are masked; an all-padding row keeps its
    first key, so it stays finite as in `attend`), a sliding window of `window` keys
    ending at the query (`local_window_size` (window - 1, 0); cuDNN's window of
    `window` keys), grouped kv heads as they are. Softmax scale 1/sqrt(Dh).
    """
    def btnh(t):  # the layout the call takes
        return t.transpose(0, 2, 1, 3)

    return jax.nn.dot_product_attention(
        btnh(q_BHTd), btnh(k_BKTd), btnh(v_BKTd), is_causal=True, query_seq_lengths=lengths_B,
        key_value_seq_lengths=jnp.maximum(lengths_B, 1), local_window_size=(window - 1, 0) if window else None,
        implementation=implementation)


def attention_context(valid_BT, sliding_window: int | None, kernel: str):
    """What `Attention` takes as its mask for `kernel`, built once per forward and shared
    by every layer: the additive bias of `attention_bias` ("blocked"), else the int32 row
    lengths [B] (right padding: mask 1 marks the real tokens, all at the start)."""
    if kernel == "blocked":
        return attention_bias(valid_BT, sliding_window)
    return jnp.sum(valid_BT, axis=1, dtype=jnp.int32)


def _heads_in(name: str) -> HFLayout:
    """Our [D, heads, Dh] from a torch Linear weight [heads*Dh, D] (heads may be sharded, Dh not)."""
    return HFLayout(name, ((1, 2), (0,)))


class Attention(nnx.Module):
    """Grouped-query self-attention with optional q/k/v(/o) biases, q/k RMSNorm and qkv clipping."""

    PARAMS = {
        "q_proj": ParamDecl(("embed", "heads", "head_dim"), (_heads_in("q_proj.weight"),)),
        "k_proj": ParamDecl(("embed", "kv_heads", "head_dim"), (_heads_in("k_proj.weight"),)),
        "v_proj": ParamDecl(("embed", "kv_heads", "head_dim"), (_heads_in("v_proj.weight"),)),
        "o_proj": ParamDecl(("heads", "head_dim", "embed"), (HFLayout("o_proj.weight", ((2,), (0, 1))),)),
        "q_bias": bias("q_proj.bias", ("heads", "head_dim")),
        "k_bias": bias("k_proj.bias", ("kv_heads", "head_dim")),
        "v_bias": bias("v_proj.bias", ("kv_heads", "head_dim")),
        "o_bias": bias("o_proj.bias", ("embed",)),
        "q_norm": norm_scale("q_norm.weight"),
        "k_norm": norm_scale("k_norm.weight"),
    }

    def __init__(self, cfg: ModelConfig, dispatch, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        D, H, K, Dh = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        sizes = {"embed": D, "heads": H, "kv_heads": K, "head_dim": Dh}
        create(self, ["q_proj", "k_proj", "v_proj", "o_proj"], rngs, sizes, param_dtype)
        if cfg.attention_bias:
            create(self, ["q_bias", "k_bias", "v_bias"], rngs, sizes, param_dtype)
        if cfg.attention_out_bias:
            create(self, ["o_bias"], rngs, sizes, param_dtype)
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm:  # per head (Qwen3) or over the whole projection (OLMoE)
            full = cfg.qk_norm == "full"
            create(self, ["q_norm"], rngs, {"norm": Dh * (H if full else 1)}, param_dtype)
            create(self, ["k_norm"], rngs, {"norm": Dh * (K if full else 1)}, param_dtype)
        self.has_bias = cfg.attention_bias
        self.has_out_bias = cfg.attention_out_bias
        self.eps = cfg.rms_norm_eps
        self.clip_qkv = cfg.clip_qkv
        self.dtype = dtype
        self.precision = precision_of(dtype)
        self.kernel = dispatch.attention
        self.blocks = (dispatch.attn_block, dispatch.attn_max_blocks)
        self.window = cfg.sliding_window

    def __call__(self, x_BTD, cos_Td, sin_Td, mask):
        """Self-attention of x [B, T, D]; `mask` is `attention_context` for this layer's kernel."""
        dt, prec = self.dtype, self.precision
        # Projections write heads-major [B, H, T, Dh] directly, the layout attention wants.
        q = jnp.einsum("BTD,DHd->BHTd", x_BTD, self.q_proj[...].astype(dt), precision=prec)
        k = jnp.einsum("BTD,DKd->BKTd", x_BTD, self.k_proj[...].astype(dt), precision=prec)
        v = jnp.einsum("BTD,DKd->BKTd", x_BTD, self.v_proj[...].astype(dt), precision=prec)
        if self.has_bias:
            q = q + self.q_bias[...].astype(dt)[:, None]
            k = k + self.k_bias[...].astype(dt)[:, None]
            v = v + self.v_bias[...].astype(dt)[:, None]
        if self.qk_norm == "head":
            q = rms_norm(q, self.q_norm[...], self.eps)
            k = rms_norm(k, self.k_norm[...], self.eps)
        elif self.qk_norm == "full":  # OLMoE normalises the whole projection (all heads) at once
            q = rms_norm(q, self.q_norm[...].reshape(q.shape[1], 1, -1), self.eps, axis=(1, 3))
            k = rms_norm(k, self.k_norm[...].reshape(k.shape[1], 1, -1), self.eps, axis=(1, 3))
        if self.clip_qkv is not None:
            q, k, v = (jnp.clip(t, -self.clip_qkv, self.clip_qkv) for t in (q, k, v))
        q = apply_rotary(q, cos_Td, sin_Td)
        k = apply_rotary(k, cos_Td, sin_Td)
        if self.kernel == "blocked":
            out = attend(q, k, v, mask, block=self.blocks[0], max_blocks=self.blocks[1], precision=prec)
            y_BTD = jnp.einsum("BHTd,HdD->BTD", out, self.o_proj[...].astype(dt), precision=prec)
        else:
            out = attend_fused(q, k, v, mask, window=self.window, implementation=self.kernel)
            y_BTD = jnp.einsum("BTHd,HdD->BTD", out, self.o_proj[...].astype(dt), precision=prec)
        return y_BTD + self.o_bias[...].astype(dt) if self.has_out_bias else y_BTD


def neuron_stats(a_BTF, valid_BT, count_mask_BT, sums: bool = False) -> dict:
    """Per-sequence statistics of FFN neurons from their activations A [B, T, F].

    "neuron_active" int32 [B, F]: counted tokens with A > 0; "nonfinite" bool [B]: a
    non-finite A on a real token (NaN is never > 0, so it would silently count as off);
    with `sums`, "neuron_act_sum" float32 [B, F]: the sum of A over the counted tokens
    where A > 0.
    """
    active = (a_BTF > 0) & count_mask_BT[..., None]
    stats = {"neuron_active": jnp.sum(active, axis=1, dtype=jnp.int32),
             "nonfinite": nonfinite_rows(a_BTF, valid_BT)}
    if sums:
        stats["neuron_act_sum"] = jnp.sum(jnp.where(active, a_BTF, 0), axis=1, dtype=jnp.float32)
    return stats


def nonfinite_rows(x_BT_, valid_BT):
    """bool [B]: some real token of the row has a non-finite value in `x_BT_` [B, T, ...]."""
    bad_BT = jnp.any(~jnp.isfinite(x_BT_.reshape(x_BT_.shape[:2] + (-1,))), axis=-1)
    return jnp.any(bad_BT & valid_BT, axis=1)


class GatedFFN(nnx.Module):
    """SwiGLU/GeGLU FFN: down(act(gate(x)) * up(x)). Its neurons are the F columns of gate."""

    PARAMS = {
        "gate_proj": ParamDecl(("embed", "mlp"), (linear("gate_proj.weight"),)),
        "up_proj": ParamDecl(("embed", "mlp"), (linear("up_proj.weight"),)),
        "down_proj": ParamDecl(("mlp", "embed"), (linear("down_proj.weight"),)),
    }

    def __init__(self, D: int, F: int, act: str, *, rngs: nnx.Rngs, dtype=jnp.float32,
                 param_dtype=jnp.float32, gate_dtype=None):
        create(self, ["gate_proj", "up_proj", "down_proj"], rngs, {"embed": D, "mlp": F}, param_dtype)
        self.act = act
        self.dtype = dtype
        self.gate_dtype = gate_dtype  # None: the gate computes in `dtype` (see `expert_mlp`)
        self.precision = precision_of(dtype)

    def __call__(self, x_BTD, valid_BT, count_mask_BT=None, keep_F=None, out_needed=None, sums: bool = False):
        """Returns (out [B, T, D], `neuron_stats` when `count_mask_BT` is given, else None).

        `keep_F` (float, 1 keep / 0 off) forces switched-off neurons' activation to 0.
        `out_needed` (traced bool; None means True): False returns zeros instead of the
        output, skipping the up and down products (counts-only last layer).
        """
        dt = self.dtype
        weights = (self.gate_proj[...].astype(self.gate_dtype or dt),
                   *(w[...].astype(dt) for w in (self.up_proj, self.down_proj)))
        dot = functools.partial(jnp.matmul, precision=self.precision)
        keep = None if keep_F is None else keep_F.astype(dt)

        def run(with_out: bool):
            def body():
                y, a = expert_mlp(x_BTD, *weights, act=activation(self.act), dot=dot, keep=keep, with_out=with_out,
                                  gate_dtype=self.gate_dtype)
                return (y if with_out else jnp.zeros_like(x_BTD)), a
            return body

        y_BTD, a_BTF = run(True)() if out_needed is None else jax.lax.cond(out_needed, run(True), run(False))
        stats = None if count_mask_BT is None else neuron_stats(a_BTF, valid_BT, count_mask_BT, sums)
        return y_BTD, stats
