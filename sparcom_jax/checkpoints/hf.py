"""Hugging Face checkpoint directories <-> CausalLM parameters.

Reading uses safetensors' numpy memory map and `get_slice`, so each parameter
shard is read straight from disk into the device that holds it
(`jax.make_array_from_callback`): on a mesh, each process reads only the
slices its devices hold, and stacked per-layer parameters are assembled one
layer at a time on device. Nothing is unpickled; torch is not needed.

Both on-disk expert layouts load: per-expert tensors (``experts.N.w1/w2/w3``,
``experts.N.gate_proj/up_proj/down_proj``) and the fused 3-D tensors
(``experts.gate_up_proj`` [E, 2G, D], ``experts.down_proj`` [E, D, G]).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open

from sparcom_jax.models.config import ModelConfig
from sparcom_jax.models.transformer import CausalLM, abstract_model, resolve_dtype
from sparcom_jax.runtime import ensure_compilation_cache

# Harmless buffers some exporters write; they are recomputed, never loaded.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "chat_template.jinja", "added_tokens.json", "generation_config.json")


class CheckpointError(ValueError):
    """A checkpoint that does not match its config or our expectations; says which file and tensor."""


def _norm(idx: tuple, shape: tuple) -> tuple[slice, ...]:
    idx = tuple(idx) + (slice(None),) * (len(shape) - len(idx))
    return tuple(slice(*s.indices(n)) for s, n in zip(idx, shape))


def _scale(s: slice, k: int) -> slice:
    return slice(s.start * k, s.stop * k)


class TensorReader:
    """Lazy access to the tensors of an HF directory, by name."""

    def __init__(self, path: Path):
        self.path = Path(path)
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            bins = sorted(p.name for p in self.path.glob("*.bin")) + sorted(p.name for p in self.path.glob("*.pt"))
            hint = (f" (found {', '.join(bins)}: pickled weights are never loaded; convert them to safetensors, "
                    "e.g. with transformers: model.save_pretrained(dir, safe_serialization=True))") if bins else ""
            raise CheckpointError(f"{self.path}: no *.safetensors files{hint}")
        index = self.path / "model.safetensors.index.json"
        self.where: dict[str, Path] = {}
        if index.exists():
            try:
                wm = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
            for name, fn in wm.items():
                p = self.path / fn
                if not p.exists():
                    raise CheckpointError(f"{index}: tensor {name!r} points to missing file {fn}")
                self.where[name] = p
        else:
            for p in files:
                with safe_open(p, framework="np") as f:
                    for name in f.keys():
                        self.where[name] = p
        self._handles: dict[Path, object] = {}
        self.used: set[str] = set()

    def _handle(self, p: Path):
        if p not in self._handles:
            self._handles[p] = safe_open(p, framework="np")
        return self._handles[p]

    def has(self, name: str) -> bool:
        return name in self.where

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(self.where[name]).get_slice(name).get_shape())

    def read(self, name: str, idx: tuple[slice, ...]) -> np.ndarray:
        """Read only `idx` of tensor `name` (in its on-disk layout)."""
        self.used.add(name)
        return self._handle(self.where[name]).get_slice(name)[idx]

    def file_of(self, name: str) -> str:
        return str(self.where.get(name, self.path))


# --------------------------------------------------------------------------- #
# Mapping: our parameter paths -> on-disk tensors
# --------------------------------------------------------------------------- #

@dataclasses.dataclass(frozen=True)
class Source:
    """How to read one per-layer (or global) slice of a parameter from HF tensors.

    `read(reader, layer, idx)` returns the numpy array for our index `idx` (which
    excludes the L axis for stacked parameters). `names(layer)` lists the HF
    tensors it consumes and `hf_shapes` their expected on-disk shapes.
    """

    read: Callable
    names: Callable
    hf_shapes: Callable


def _linear_T(name_fn):
    """HF Linear weight [out, in] -> ours [in, out]."""
    def read(r, l, idx):
        a, b = idx
        return r.read(name_fn(l), (b, a)).T
    return read


def _heads_in(name_fn, n_heads, Dh):
    """HF q/k/v weight [n*Dh, D] -> ours [D, n, Dh] (heads may be sharded, head width is not)."""
    def read(r, l, idx):
        sd, sh, sdh = idx
        w = r.read(name_fn(l), (_scale(sh, Dh), sd))  # [h*Dh, d]
        return w.reshape(sh.stop - sh.start, Dh, -1).transpose(2, 0, 1)[:, :, sdh]
    return read


def _heads_bias(name_fn, Dh):
    def read(r, l, idx):
        sh, sdh = idx
        return r.read(name_fn(l), (_scale(sh, Dh),)).reshape(-1, Dh)[:, sdh]
    return read


def _heads_out(name_fn, Dh):
    """HF o_proj [D, H*Dh] -> ours [H, Dh, D]."""
    def read(r, l, idx):
        sh, sdh, sd = idx
        w = r.read(name_fn(l), (sd, _scale(sh, Dh)))  # [d, h*Dh]
        return w.reshape(w.shape[0], -1, Dh).transpose(1, 2, 0)[:, sdh, :]
    return read


def _plain(name_fn):
    def read(r, l, idx):
        return r.read(name_fn(l), idx)
    return read


def _expert_stack(name_fn, transpose: bool):
    """Per-expert tensors experts.{e}.* [out, in] stacked to ours [E, in, out]."""
    def read(r, l, idx):
        se, a, b = idx
        return np.stack([r.read(name_fn(l, e), (b, a)).T if transpose else r.read(name_fn(l, e), (a, b))
                         for e in range(se.start, se.stop)])
    return read


def _moe_prefix(cfg: ModelConfig, r: TensorReader | None) -> str:
    """Mixtral checkpoints (and transformers' save_pretrained) use the legacy ``block_sparse_moe``."""
    if cfg.model_type == "mixtral" and (r is None or r.has("model.layers.0.block_sparse_moe.gate.weight")):
        return "block_sparse_moe"
    return "mlp"


def _expert_layout(cfg: ModelConfig, r: TensorReader | None, pre: str) -> str:
    if r is None:
        return "per_expert"
    if r.has(f"model.layers.0.{pre}.experts.gate_up_proj"):
        return "fused"
    return "per_expert"


def parameter_sources(cfg: ModelConfig, r: TensorReader | None) -> dict[tuple[str, ...], Source]:
    """For every parameter path of CausalLM(cfg): where it lives on disk.

    `r` (optional) tells which on-disk variant is present (Mixtral's legacy
    ``block_sparse_moe`` prefix, fused or per-expert layout); None gives the
    layout we write.
    """
    D, H, K, Dh, V = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size
    lp = "model.layers.{l}."
    S: dict[tuple[str, ...], Source] = {}

    def add(path, read, names, shapes):
        S[tuple(path.split("."))] = Source(read, names, shapes)

    def simple(path, hf, shape, read_factory=_plain, *extra):
        fn = (lambda l, hf=hf: (lp + hf).format(l=l))
        add(path, read_factory(fn, *extra), lambda l, fn=fn: [fn(l)], lambda: [shape])

    glob = lambda n: (lambda l: n)  # noqa: E731
    add("embed", _plain(glob("model.embed_tokens.weight")), lambda l: ["model.embed_tokens.weight"], lambda: [(V, D)])
    add("final_norm.weight", _plain(glob("model.norm.weight")), lambda l: ["model.norm.weight"], lambda: [(D,)])
    if not cfg.tie_word_embeddings:
        add("lm_head", _linear_T(glob("lm_head.weight")), lambda l: ["lm_head.weight"], lambda: [(V, D)])

    simple("blocks.input_norm.weight", "input_layernorm.weight", (D,))
    simple("blocks.post_attn_norm.weight", "post_attention_layernorm.weight", (D,))
    simple("blocks.attn.q_proj", "self_attn.q_proj.weight", (H * Dh, D), _heads_in, H, Dh)
    simple("blocks.attn.k_proj", "self_attn.k_proj.weight", (K * Dh, D), _heads_in, K, Dh)
    simple("blocks.attn.v_proj", "self_attn.v_proj.weight", (K * Dh, D), _heads_in, K, Dh)
    simple("blocks.attn.o_proj", "self_attn.o_proj.weight", (D, H * Dh), _heads_out, Dh)
    if cfg.attention_bias:
        simple("blocks.attn.q_bias", "self_attn.q_proj.bias", (H * Dh,), _heads_bias, Dh)
        simple("blocks.attn.k_bias", "self_attn.k_proj.bias", (K * Dh,), _heads_bias, Dh)
        simple("blocks.attn.v_bias", "self_attn.v_proj.bias", (K * Dh,), _heads_bias, Dh)
    if cfg.qk_norm == "head":
        simple("blocks.attn.q_norm", "self_attn.q_norm.weight", (Dh,))
        simple("blocks.attn.k_norm", "self_attn.k_norm.weight", (Dh,))
    elif cfg.qk_norm == "full":
        simple("blocks.attn.q_norm", "self_attn.q_norm.weight", (H * Dh,))
        simple("blocks.attn.k_norm", "self_attn.k_norm.weight", (K * Dh,))

    def dense_ffn(prefix_ours, prefix_hf, F):
        simple(f"{prefix_ours}.gate_proj", f"{prefix_hf}.gate_proj.weight", (F, D), _linear_T)
        simple(f"{prefix_ours}.up_proj", f"{prefix_hf}.up_proj.weight", (F, D), _linear_T)
        simple(f"{prefix_ours}.down_proj", f"{prefix_hf}.down_proj.weight", (D, F), _linear_T)

    if not cfg.is_moe:
        dense_ffn("blocks.ffn", "mlp", cfg.intermediate_size)
        return S

    E, G = cfg.num_experts, cfg.moe_intermediate_size
    pre = _moe_prefix(cfg, r)
    simple("blocks.ffn.router", f"{pre}.gate.weight", (E, D), _linear_T)
    if cfg.has_shared_expert:
        dense_ffn("blocks.ffn.shared_expert", "mlp.shared_expert", cfg.shared_expert_intermediate_size)
        simple("blocks.ffn.shared_expert_gate", "mlp.shared_expert_gate.weight", (1, D), _linear_T)

    if _expert_layout(cfg, r, pre) == "fused":
        gu = lambda l: (lp + f"{pre}.experts.gate_up_proj").format(l=l)  # noqa: E731
        dn = lambda l: (lp + f"{pre}.experts.down_proj").format(l=l)  # noqa: E731
        transposed = r is not None and r.shape(gu(0)) == (E, D, 2 * G) and D != 2 * G

        def fused_half(offset):
            def read(rr, l, idx):
                se, sd, sg = idx
                sg_off = slice(sg.start + offset, sg.stop + offset)
                if transposed:
                    return rr.read(gu(l), (se, sd, sg_off))
                return rr.read(gu(l), (se, sg_off, sd)).transpose(0, 2, 1)
            return read

        def down_read(rr, l, idx):
            se, sg, sd = idx
            if r is not None and r.shape(dn(0)) == (E, G, D) and D != G:
                return rr.read(dn(l), (se, sg, sd))
            return rr.read(dn(l), (se, sd, sg)).transpose(0, 2, 1)

        gu_shape = (lambda: [r.shape(gu(0)) if r.shape(gu(0)) in ((E, 2 * G, D), (E, D, 2 * G)) else (E, 2 * G, D)])
        S[("blocks", "ffn", "gate_proj")] = Source(fused_half(0), lambda l: [gu(l)], gu_shape)
        S[("blocks", "ffn", "up_proj")] = Source(fused_half(G), lambda l: [gu(l)], gu_shape)
        S[("blocks", "ffn", "down_proj")] = Source(
            down_read, lambda l: [dn(l)],
            lambda: [r.shape(dn(0)) if r.shape(dn(0)) in ((E, D, G), (E, G, D)) else (E, D, G)])
        return S

    w1, w3, w2 = (("w1", "w3", "w2") if cfg.model_type == "mixtral" and pre == "block_sparse_moe"
                  else ("gate_proj", "up_proj", "down_proj"))
    for ours, hf, shape in (("gate_proj", w1, (G, D)), ("up_proj", w3, (G, D)), ("down_proj", w2, (D, G))):
        fn = (lambda l, e, hf=hf: (lp + f"{pre}.experts.{e}.{hf}.weight").format(l=l))
        S[("blocks", "ffn", ours)] = Source(_expert_stack(fn, True),
                                            lambda l, fn=fn: [fn(l, e) for e in range(E)],
                                            lambda shape=shape: [shape] * E)
    return S


# --------------------------------------------------------------------------- #
# Loading
# --------------------------------------------------------------------------- #

def _check_tensors(cfg: ModelConfig, sources, r: TensorReader, config_path: str):
    for path, src in sources.items():
        layers = range(cfg.num_layers) if path[0] == "blocks" else [0]
        for l in layers:
            for name, shape in zip(src.names(l), src.hf_shapes()):
                if not r.has(name):
                    raise CheckpointError(
                        f"{r.path}: tensor {name!r} is missing (needed for {'.'.join(path)} of a "
                        f"{cfg.model_type} model as described by {config_path}); the checkpoint is incomplete "
                        "or config.json belongs to another model")
                got = r.shape(name)
                if tuple(got) != tuple(shape):
                    raise CheckpointError(
                        f"{r.file_of(name)}: tensor {name!r} has shape {tuple(got)} but {config_path} implies "
                        f"{tuple(shape)} (hidden_size={cfg.hidden_size}, heads={cfg.num_heads}/{cfg.num_kv_heads}, "
                        f"head_dim={cfg.head_dim}, intermediate={cfg.intermediate_size or cfg.moe_intermediate_size}, "
                        f"experts={cfg.num_experts}, vocab={cfg.vocab_size}); the config disagrees with the weights")
    expected = {n for path, src in sources.items()
                for l in (range(cfg.num_layers) if path[0] == "blocks" else [0]) for n in src.names(l)}
    extra = [n for n in r.where if n not in expected and not n.endswith(_IGNORED_SUFFIXES)
             and not (cfg.tie_word_embeddings and n == "lm_head.weight")]
    if extra:
        shown = ", ".join(sorted(extra)[:8]) + (" ..." if len(extra) > 8 else "")
        raise CheckpointError(
            f"{r.path}: {len(extra)} unexpected tensor(s) not used by a {cfg.model_type} model per {config_path}: "
            f"{shown}. The config may not match the weights (e.g. wrong num_hidden_layers or model_type).")


def load_params(model: CausalLM, path: str | Path, *, mesh=None, rules=None) -> None:
    """Fill `model` (possibly abstract) in place with the weights of HF directory `path`."""
    from sparcom_jax.parallel.sharding import param_shardings

    cfg = model.config
    r = TensorReader(Path(path))
    sources = parameter_sources(cfg, r)
    _check_tensors(cfg, sources, r, str(Path(path) / "config.json"))
    state = nnx.state(model, nnx.Param)
    shardings = param_shardings(state, mesh=mesh, rules=rules)
    flat = dict(nnx.to_flat_state(state))
    flat_sh = dict(nnx.to_flat_state(shardings)) if not isinstance(shardings, dict) else shardings
    new_values = {}
    for key, var in flat.items():
        key_t = tuple(str(k) for k in key)
        src = sources.get(key_t)
        if src is None:
            raise CheckpointError(f"internal: no on-disk mapping for parameter {'.'.join(key_t)}")
        shape, dtype = tuple(var.shape), var.dtype
        sh = flat_sh[key]
        sh = sh.value if hasattr(sh, "value") else sh
        if key_t[0] != "blocks":
            new_values[key] = jax.make_array_from_callback(
                shape, sh, lambda idx, s=src, shape=shape, dt=dtype: np.asarray(s.read(r, 0, _norm(idx, shape)), dtype=dt))
            continue
        layer_sh = jax.sharding.NamedSharding(sh.mesh, jax.sharding.PartitionSpec(*tuple(sh.spec)[1:])) \
            if isinstance(sh, jax.sharding.NamedSharding) else sh
        stacked = jnp.zeros(shape, dtype, device=sh)
        setter = _layer_setter(sh)
        for l in range(cfg.num_layers):
            layer = jax.make_array_from_callback(
                shape[1:], layer_sh,
                lambda idx, s=src, l=l, shp=shape[1:], dt=dtype: np.asarray(s.read(r, l, _norm(idx, shp)), dtype=dt))
            stacked = setter(stacked, layer, l)
        new_values[key] = stacked
    for key, value in new_values.items():
        flat[key].value = value
    nnx.update(model, nnx.from_flat_state(flat))


_SETTERS: dict = {}


def _layer_setter(sharding):
    if sharding not in _SETTERS:
        _SETTERS[sharding] = jax.jit(
            lambda stacked, layer, l: jax.lax.dynamic_update_index_in_dim(stacked, layer, l, 0),
            donate_argnums=0, out_shardings=sharding)
    return _SETTERS[sharding]


def load_tokenizer(path: str | Path):
    """The directory's tokenizer through transformers' AutoTokenizer (offline), or None if it has none."""
    p = Path(path)
    if not any((p / f).exists() for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(p), local_files_only=True)


def load_model(path: str | Path, dtype="float32", mesh=None, *, param_dtype=None, rules=None,
               with_tokenizer: bool = True, moe_impl: str = "auto") -> CausalLM:
    """Load a Hugging Face causal-LM directory into a Flax model.

    Args:
      path: directory with config.json and *.safetensors (optionally sharded with
        model.safetensors.index.json) and, optionally, tokenizer files.
      dtype: compute dtype, "float32" or "bfloat16".
      mesh: optional `jax.sharding.Mesh` with axes ("data", "model"); parameters are
        created already sharded by the sharding rules.
      param_dtype: storage dtype of parameters (default: `dtype`).
      rules: optional logical-axis rules overriding the defaults.
      moe_impl: expert dispatch ("auto", "capacity", "ragged", "tiled", "looped"); see `CausalLM`.

    Returns:
      CausalLM; ``model.tokenizer`` is the directory's tokenizer or None and
      ``model.source_path`` the directory.
    """
    ensure_compilation_cache()
    p = Path(path)
    if not p.is_dir():
        raise CheckpointError(f"{p}: not a directory; pass a Hugging Face model directory (config.json + *.safetensors)")
    cfg = ModelConfig.from_pretrained(p)
    model = abstract_model(cfg, dtype=dtype, param_dtype=param_dtype, moe_impl=moe_impl)
    load_params(model, p, mesh=mesh, rules=rules)
    model.tokenizer = load_tokenizer(p) if with_tokenizer else None
    model.source_path = str(p)
    return model


# --------------------------------------------------------------------------- #
# Saving
# --------------------------------------------------------------------------- #

def hf_state_dict(model: CausalLM) -> dict[str, np.ndarray]:
    """Our parameters as HF-named numpy tensors (per-expert layout, as save_pretrained writes)."""
    cfg = model.config
    sources = parameter_sources(cfg, None)
    flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    out: dict[str, np.ndarray] = {}
    D, H, Dh = cfg.hidden_size, cfg.num_heads, cfg.head_dim

    for key, var in flat.items():
        key_t = tuple(str(k) for k in key)
        value = np.asarray(jax.device_get(var.value))
        names = sources[key_t].names
        layers = range(cfg.num_layers) if key_t[0] == "blocks" else [None]
        for l in layers:
            v = value if l is None else value[l]
            leaf = key_t[-1]
            hf_names = names(l if l is not None else 0)
            if leaf in ("q_proj", "k_proj", "v_proj"):
                t = v.reshape(D, -1).T
            elif leaf == "o_proj":
                t = v.reshape(H * Dh, D).T
            elif leaf in ("q_bias", "k_bias", "v_bias"):
                t = v.reshape(-1)
            elif key_t[-2:] in (("ffn", "gate_proj"), ("ffn", "up_proj"), ("ffn", "down_proj")) and cfg.is_moe:
                for e, name in enumerate(hf_names):
                    out[name] = np.ascontiguousarray(v[e].T)
                continue
            elif v.ndim == 2 and key_t != ("embed",):
                t = v.T
            else:
                t = v
            out[hf_names[0]] = np.ascontiguousarray(t)
    return out


def save_model(model: CausalLM, path: str | Path, *, tokenizer=None, dtype: str | None = None) -> Path:
    """Write `model` as a Hugging Face directory that transformers loads unchanged.

    Writes config.json, model.safetensors and the tokenizer files (from `tokenizer`
    or ``model.tokenizer``). The directory appears atomically: everything is
    written to a temporary sibling first, then renamed.
    """
    from safetensors.numpy import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp", dir=path.parent))
    try:
        tensors = hf_state_dict(model)
        if dtype is not None:
            target = np.dtype(resolve_dtype(dtype))
            tensors = {k: v.astype(target) for k, v in tensors.items()}
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        hf = model.config.to_hf_config()
        any_t = next(iter(tensors.values()))
        hf["torch_dtype"] = "bfloat16" if any_t.dtype == jnp.bfloat16 else str(any_t.dtype)
        (tmp / "config.json").write_text(json.dumps(hf, indent=2))
        tok = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
        if tok is not None:
            tok.save_pretrained(str(tmp))
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            if old.exists():
                shutil.rmtree(old)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path

