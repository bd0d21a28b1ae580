"""One frozen dataclass describes every supported model family.

Families differ only in a handful of mechanisms (q/k/v biases, q/k norms, MoE
routing, shared experts, RoPE scaling), so one config with explicit switches
replaces per-family classes, and what sets the switches for each ``model_type`` is
one row of data in `FAMILIES`: adding a family that differs only in data is a new
row plus its parity test. `from_hf_config` reads a Hugging Face ``config.json``
dict (old ``rope_theta``/``rope_scaling`` keys and the newer ``rope_parameters``
both work); `to_hf_config` writes one back that transformers loads unchanged.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
from pathlib import Path
from typing import Any

from sparcom_jax.errors import ConfigError

SUPPORTED_ACTIVATIONS = ("silu", "swish", "gelu", "gelu_new", "gelu_pytorch_tanh", "relu")


def _misspelled(key: str, hf: dict) -> str:
    """" (it has 'num_hiden_layers': ...)" when `hf` holds a set key spelled like the missing `key`
    (a hand-edited config.json), else ""."""
    close = difflib.get_close_matches(key, [k for k in hf if isinstance(k, str) and hf[k] is not None], n=1,
                                      cutoff=0.85)
    return f" (it has {close[0]!r}: a misspelling? name it {key!r})" if close else ""


@dataclasses.dataclass(frozen=True)
class Family:
    """How one ``model_type`` differs from the others, as data (one row of `FAMILIES`).

    Attributes:
      architecture: the transformers class written to config.json.
      moe: every layer's FFN is a routed MoE.
      qk_norm: None, "head" (RMSNorm per head, Qwen3) or "full" (over the whole
        projection, OLMoE).
      bias_key: config.json key switching the attention biases on (None: the family
        has none); bias_default: its value when absent.
      bias_out: the switch also gives o_proj a bias (Llama style), not only q/k/v (Qwen2).
      sliding_flag: a sliding window applies only with ``use_sliding_window`` (Qwen).
      window_layers: which layers transformers gives the ``sliding_window``: None (none;
        the family ignores the key), "all", "from" (layers >= ``max_window_layers``,
        Qwen2/Qwen3) or "alternate" (even layers < ``max_window_layers``, Qwen2-MoE);
        an explicit ``layer_types`` list overrides the last two, as in transformers.
      experts_key / expert_width_key: config.json keys of the expert count and width
        (written; reading also accepts ``num_local_experts`` and ``num_experts``).
      norm_topk_prob: fixed by the family (Mixtral always renormalises), None = read it.
      shared_expert: a sigmoid-gated shared expert beside the routed ones (Qwen-MoE).
      hf_aliases: alternative tensor namings, each a tuple of (canonical substring,
        replacement) pairs; loading tries them in order, then the canonical names, and
        saving writes the first (Mixtral checkpoints use ``block_sparse_moe``/``w1..w3``).
    """

    architecture: str
    moe: bool = False
    qk_norm: str | None = None
    bias_key: str | None = "attention_bias"
    bias_default: bool = False
    bias_out: bool = True
    sliding_flag: bool = False
    window_layers: str | None = "all"
    experts_key: str = "num_experts"
    expert_width_key: str = "moe_intermediate_size"
    norm_topk_prob: bool | None = None
    shared_expert: bool = False
    hf_aliases: tuple[tuple[tuple[str, str], ...], ...] = ()


_MIXTRAL_NAMES = (("mlp.gate.", "block_sparse_moe.gate."), ("mlp.experts.", "block_sparse_moe.experts."),
                  (".gate_proj.", ".w1."), (".up_proj.", ".w3."), (".down_proj.", ".w2."))
FAMILIES: dict[str, Family] = {
    "llama": Family("LlamaForCausalLM", window_layers=None),
    "mistral": Family("MistralForCausalLM", bias_key=None),
    "qwen2": Family("Qwen2ForCausalLM", bias_key="qkv_bias", bias_default=True, bias_out=False, sliding_flag=True,
                    window_layers="from"),
    "qwen3": Family("Qwen3ForCausalLM", qk_norm="head", sliding_flag=True, window_layers="from"),
    "mixtral": Family("MixtralForCausalLM", moe=True, bias_key=None, experts_key="num_local_experts",
                      expert_width_key="intermediate_size", norm_topk_prob=True, hf_aliases=(_MIXTRAL_NAMES,)),
    "qwen2_moe": Family("Qwen2MoeForCausalLM", moe=True, bias_key="qkv_bias", bias_default=True, bias_out=False,
                        sliding_flag=True, window_layers="alternate", shared_expert=True),
    "olmoe": Family("OlmoeForCausalLM", moe=True, qk_norm="full", expert_width_key="intermediate_size",
                    window_layers=None),
    "qwen3_moe": Family("Qwen3MoeForCausalLM", moe=True, qk_norm="head", sliding_flag=True),
}


def _supported() -> str:
    return ", ".join(FAMILIES)


# transformers' default of ``max_window_layers`` (Qwen2, Qwen3, Qwen2-MoE).
_MAX_WINDOW_LAYERS = 28


_REQUIRED = object()  # `num`'s default: the field must be given


def _sliding_window(hf: dict[str, Any], fam: Family, n_layers: int, source: str) -> int | None:
    """The sliding window every layer attends within, as transformers applies it, or None.

    Raises:
      ConfigError: when transformers would give the window to some layers only.
    """
    window = hf.get("sliding_window")
    if not window or fam.window_layers is None or (fam.sliding_flag and not hf.get("use_sliding_window", False)):
        return None
    if fam.window_layers == "all":
        return int(window)
    types = hf.get("layer_types")
    if types is None:
        first = int(hf.get("max_window_layers", _MAX_WINDOW_LAYERS))
        types = ["sliding_attention" if (i >= first if fam.window_layers == "from" else i < first and i % 2 == 0)
                 else "full_attention" for i in range(n_layers)]
    slides = [i for i, t in enumerate(types) if t == "sliding_attention"]
    if not slides:
        return None
    if len(slides) < n_layers:
        raise ConfigError(
            f"{source}: a sliding window on some layers only (layers {slides} of {n_layers}, from "
            f"{'layer_types' if 'layer_types' in hf else 'max_window_layers'}) is not supported; every layer "
            "must attend alike (use_sliding_window=false, or a window on every layer)")
    return int(window)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a decoder-only transformer (dense or Mixture-of-Experts).

    Axis letters: see `sparcom_jax.axes`. Family-specific facts live in `FAMILIES`.
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int = 0
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_type: str = "default"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position: int = 8192
    max_position_embeddings: int = 4096
    sliding_window: int | None = None
    attention_bias: bool = False  # biases on q/k/v
    attention_out_bias: bool = False  # and on o_proj (Llama-style families with attention_bias)
    qk_norm: str | None = None  # None | "head" (Qwen3: per head) | "full" (OLMoE: whole projection)
    clip_qkv: float | None = None
    tie_word_embeddings: bool = False
    # Mixture-of-Experts
    num_experts: int = 0
    top_k: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False
    shared_expert_intermediate_size: int = 0
    # Token ids, kept for the round trip to config.json
    bos_token_id: int | None = None
    eos_token_id: Any = None
    pad_token_id: int | None = None

    # ---- derived values -------------------------------------------------
    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def has_dense_ffn(self) -> bool:
        return not self.is_moe

    @property
    def has_shared_expert(self) -> bool:
        return self.is_moe and self.shared_expert_intermediate_size > 0

    @property
    def neuron_width(self) -> int:
        """Width F of the per-layer neuron count array (dense FFN or shared expert), 0 if none."""
        if self.has_dense_ffn:
            return self.intermediate_size
        return self.shared_expert_intermediate_size

    @property
    def q_width(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.num_kv_heads * self.head_dim

    def param_count(self) -> int:
        """Number of parameters, from the declared shapes (an abstract model: no memory, no compute)."""
        from sparcom_jax.models.transformer import abstract_model, param_count

        return param_count(abstract_model(self))

    def validate(self) -> "ModelConfig":
        def need(cond: bool, msg: str):
            if not cond:
                raise ConfigError(msg)

        need(self.model_type in FAMILIES,
             f"model_type {self.model_type!r} is not supported; supported: {_supported()}")
        need(self.hidden_act in SUPPORTED_ACTIVATIONS,
             f"hidden_act {self.hidden_act!r} is not supported; use one of {SUPPORTED_ACTIVATIONS}")
        need(self.num_heads % self.num_kv_heads == 0,
             f"num_attention_heads={self.num_heads} is not a multiple of num_key_value_heads={self.num_kv_heads}")
        need(self.head_dim % 2 == 0, f"head_dim={self.head_dim} must be even for rotary embeddings")
        need(self.sliding_window is None or FAMILIES[self.model_type].window_layers is not None,
             f"model_type {self.model_type!r} has no sliding-window attention; set sliding_window=None")
        need(self.rope_type in ("default", "linear", "llama3"),
             f"rope type {self.rope_type!r} is not supported; supported: default, linear, llama3")
        if self.is_moe:
            need(0 < self.top_k <= self.num_experts,
                 f"num_experts_per_tok={self.top_k} must be in 1..num_experts={self.num_experts}")
            need(self.moe_intermediate_size > 0, "MoE config has no expert FFN width (moe_intermediate_size)")
        else:
            need(self.intermediate_size > 0, "dense config has no intermediate_size")
        return self

    # ---- Hugging Face round trip ---------------------------------------
    @classmethod
    def from_hf_config(cls, hf: dict[str, Any], source: str = "config.json") -> "ModelConfig":
        """Build a config from a Hugging Face config dict (its family's row says how to read it).

        Raises:
          ConfigError: naming `source` and the offending field.
        """
        mt = hf.get("model_type")
        if mt is None:
            raise ConfigError(f"{source}: no 'model_type' field; is this a Hugging Face causal-LM config.json?")
        if hf.get("auto_map") and mt not in FAMILIES:
            raise ConfigError(
                f"{source}: model_type {mt!r} needs trust_remote_code (custom code in 'auto_map'); "
                f"sparcom_jax runs no remote code. Supported: {_supported()}")
        if mt not in FAMILIES:
            raise ConfigError(f"{source}: model_type {mt!r} is not supported; supported: {_supported()}")
        quant = hf.get("quantization_config")
        if quant:  # GPTQ, AWQ, bitsandbytes, FP8, ...: the stored tensors need scales we do not apply
            method = quant.get("quant_method", "unknown method") if isinstance(quant, dict) else quant
            raise ConfigError(f"{source}: a quantized checkpoint (quantization_config: {method}); sparcom_jax reads "
                              "float16 / bfloat16 / float32 weights only. Use the model's unquantized release")
        fam = FAMILIES[mt]

        def get(key, default=None, *alts):
            for k in (key, *alts):
                if hf.get(k) is not None:
                    return hf[k]
            return default

        def num(key, cast=int, default=_REQUIRED, *alts):
            """Field `key` (else the first of `alts` given) as a number; the error names it."""
            v = get(key, None, *alts)
            if v is None:
                if default is _REQUIRED:
                    raise ConfigError(f"{source}: required field {key!r} is missing (or null){_misspelled(key, hf)}; "
                                      "copy it from the model's published config.json")
                return default
            try:
                return cast(v)
            except (TypeError, ValueError):
                raise ConfigError(f"{source}: field {key!r} must be {'an integer' if cast is int else 'a number'}, "
                                  f"got {v!r}; compare with the model's published config.json") from None

        try:
            D = num("hidden_size")
            H = num("num_attention_heads")
            L = num("num_hidden_layers")
            rope = dict(get("rope_parameters", {}) or {})
            scaling = dict(get("rope_scaling", {}) or {})
            rope.update({k: v for k, v in scaling.items() if k not in rope})
            max_pos = num("max_position_embeddings", int, 4096)
            sliding = _sliding_window(hf, fam, L, source)
            bias = bool(hf.get(fam.bias_key, fam.bias_default)) if fam.bias_key else False
            if hf.get("mlp_bias"):
                raise ConfigError(f"{source}: mlp_bias=true is not supported (no supported family uses it)")
            if fam.moe:
                sparse_step = int(hf.get("decoder_sparse_step", 1) or 1)
                dense_layers = list(hf.get("mlp_only_layers", []) or [])
                if sparse_step != 1 or dense_layers:
                    raise ConfigError(
                        f"{source}: mixed dense/MoE layer stacks (decoder_sparse_step={sparse_step}, "
                        f"mlp_only_layers={dense_layers}) are not supported; every layer must be MoE")
            cfg = cls(
                model_type=mt,
                vocab_size=num("vocab_size"),
                hidden_size=D,
                num_layers=L,
                num_heads=H,
                num_kv_heads=num("num_key_value_heads", int, H),
                head_dim=num("head_dim", int, D // H if H else 0),
                intermediate_size=0 if fam.moe else num("intermediate_size", int, 0),
                hidden_act=str(get("hidden_act", "silu")),
                rms_norm_eps=num("rms_norm_eps", float, 1e-6),
                rope_theta=float(rope.get("rope_theta", get("rope_theta", 10000.0))),
                rope_type=str(rope.get("rope_type", rope.get("type", "default")) or "default"),
                rope_factor=float(rope.get("factor", 1.0)),
                rope_low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
                rope_high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
                rope_original_max_position=int(rope.get("original_max_position_embeddings", max_pos)),
                max_position_embeddings=max_pos,
                sliding_window=int(sliding) if sliding else None,
                attention_bias=bias,
                attention_out_bias=bias and fam.bias_out,
                qk_norm=fam.qk_norm,
                clip_qkv=float(hf["clip_qkv"]) if hf.get("clip_qkv") is not None else None,
                tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
                num_experts=num(fam.experts_key, int, 0, "num_local_experts", "num_experts") if fam.moe else 0,
                top_k=num("num_experts_per_tok", int, 0) if fam.moe else 0,
                moe_intermediate_size=num(fam.expert_width_key, int, 0) if fam.moe else 0,
                norm_topk_prob=(fam.norm_topk_prob if fam.norm_topk_prob is not None
                                else bool(hf.get("norm_topk_prob", False))),
                shared_expert_intermediate_size=(num("shared_expert_intermediate_size", int, 0)
                                                 if fam.shared_expert else 0),
                bos_token_id=hf.get("bos_token_id"),
                eos_token_id=(tuple(hf["eos_token_id"]) if isinstance(hf.get("eos_token_id"), list)
                              else hf.get("eos_token_id")),
                pad_token_id=hf.get("pad_token_id"),
            )
        except ConfigError:
            raise
        except (TypeError, KeyError, ValueError) as e:  # e.g. a rope_scaling entry that is not a number
            raise ConfigError(f"{source}: invalid field ({e}); compare with the model's published config.json") from e
        try:
            return cfg.validate()
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "ModelConfig":
        p = Path(path) / "config.json"
        if not p.exists():
            raise ConfigError(f"{p}: not found; a Hugging Face model directory needs config.json")
        try:
            hf = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{p}:{e.lineno}: invalid JSON ({e.msg})") from None
        return cls.from_hf_config(hf, source=str(p))

    def to_hf_config(self) -> dict[str, Any]:
        """A config.json dict that transformers' AutoConfig reads back to the same model."""
        fam = FAMILIES[self.model_type]
        hf: dict[str, Any] = {
            "architectures": [fam.architecture],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": self.hidden_act,
            "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "rope_theta": self.rope_theta,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "torch_dtype": "float32",
            # Written even when unset: Mistral's own default is a 4096-token window.
            "sliding_window": self.sliding_window,
        }
        rope: dict[str, Any] = {"rope_type": self.rope_type, "rope_theta": self.rope_theta}
        if self.rope_type != "default":
            rope["factor"] = self.rope_factor
        if self.rope_type == "llama3":
            rope.update(low_freq_factor=self.rope_low_freq_factor, high_freq_factor=self.rope_high_freq_factor,
                        original_max_position_embeddings=self.rope_original_max_position)
        hf["rope_parameters"] = rope
        if self.rope_type != "default":
            hf["rope_scaling"] = dict(rope)
        if fam.bias_key:
            hf[fam.bias_key] = self.attention_bias
        if self.sliding_window and fam.sliding_flag:
            hf["use_sliding_window"] = True
        if self.sliding_window and fam.window_layers not in (None, "all"):
            hf["layer_types"] = ["sliding_attention"] * self.num_layers  # else transformers slides only some
        if self.clip_qkv is not None:
            hf["clip_qkv"] = self.clip_qkv
        if not self.is_moe:
            hf["intermediate_size"] = self.intermediate_size
            return hf
        hf["num_experts_per_tok"] = self.top_k
        hf[fam.experts_key] = self.num_experts
        hf[fam.expert_width_key] = self.moe_intermediate_size
        if fam.norm_topk_prob is None:
            hf["norm_topk_prob"] = self.norm_topk_prob
        if fam.expert_width_key != "intermediate_size":
            hf["intermediate_size"] = max(self.shared_expert_intermediate_size, self.moe_intermediate_size)
            hf["decoder_sparse_step"] = 1
            hf["mlp_only_layers"] = []
        if fam.shared_expert:
            hf["shared_expert_intermediate_size"] = self.shared_expert_intermediate_size
        return hf


def rope_inv_freq(cfg: ModelConfig):
    """Inverse RoPE frequencies [Dh/2] in float64 numpy, as transformers computes them."""
    import numpy as np

    dim = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    inv = inv.astype(np.float32)
    if cfg.rope_type == "linear":
        return inv  # positions are divided by the factor instead
    if cfg.rope_type == "llama3":
        factor, lo, hi = cfg.rope_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
        old = cfg.rope_original_max_position
        low_wl, high_wl = old / lo, old / hi
        wavelen = 2 * math.pi / inv
        inv_l = np.where(wavelen > low_wl, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * inv_l / factor + smooth * inv_l
        medium = ~(wavelen < high_wl) & ~(wavelen > low_wl)
        inv = np.where(medium, smoothed, inv_l).astype(np.float32)
    return inv
