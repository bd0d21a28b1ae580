"""Hugging Face checkpoint directories <-> CausalLM parameters.

Reading uses safetensors' numpy memory map and `get_slice`, so each parameter
shard is read straight from disk into the device that holds it
(`jax.make_array_from_callback`): on a mesh, each process reads only the
slices its devices hold, and stacked per-layer parameters are assembled one
layer at a time on device. Nothing is unpickled; torch is not needed.

Names and layouts come from the parameter declarations (`sparcom_jax.models.params`)
and the family table (`sparcom_jax.models.config.FAMILIES`): no per-family code here.
Both on-disk expert layouts load: per-expert tensors (``experts.N.w1/w2/w3``,
``experts.N.gate_proj/up_proj/down_proj``) and the fused 3-D tensors
(``experts.gate_up_proj`` [E, 2G, D], ``experts.down_proj`` [E, D, G], or transposed).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import SafetensorError, safe_open

from sparcom_jax.fileio import atomic_dir
from sparcom_jax.models.config import FAMILIES, ModelConfig
from sparcom_jax.models.params import Entry, HFLayout, entries
from sparcom_jax.models.transformer import CausalLM, abstract_model, resolve_dtype
from sparcom_jax.parallel.mesh import check_mesh
from sparcom_jax.runtime import ensure_compilation_cache

# Stored dtypes read as weights: quantized integers or float8 need scales we do not apply.
_FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
# Harmless buffers some exporters write; they are recomputed, never loaded.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "chat_template.jinja", "added_tokens.json", "generation_config.json")


class CheckpointError(ValueError):
    """A checkpoint that does not match its config or our expectations; says which file and tensor."""


def _weight_map(index: Path) -> dict[str, str]:
    """The tensor -> shard file map of a safetensors index, checked."""
    try:
        wm = json.loads(index.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{index}:{e.lineno}: not a valid safetensors index (invalid JSON: {e.msg}); "
                              "download the model again") from None
    wm = wm.get("weight_map") if isinstance(wm, dict) else None
    if not isinstance(wm, dict) or not all(isinstance(fn, str) for fn in wm.values()):
        raise CheckpointError(f"{index}: not a valid safetensors index (it needs \"weight_map\": {{tensor name: "
                              "shard file name}, as save_pretrained writes it); download the model again")
    return wm


def _norm(idx: tuple, shape: tuple) -> tuple[slice, ...]:
    idx = tuple(idx) + (slice(None),) * (len(shape) - len(idx))
    return tuple(slice(*s.indices(n)) for s, n in zip(idx, shape))


def _open(p: Path):
    try:
        return safe_open(p, framework="np")
    except SafetensorError as e:
        raise CheckpointError(
            f"{p}: not a readable safetensors file ({e}); it is truncated or corrupted (an interrupted "
            "download or copy?). Download it again, or re-save the checkpoint from an intact copy") from None


class TensorReader:
    """Lazy access to the tensors of an HF directory, by name."""

    def __init__(self, path: Path):
        self.path = Path(path)
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            bins = sorted(p.name for p in self.path.glob("*.bin")) + sorted(p.name for p in self.path.glob("*.pt"))
            hint = (f" (found {', '.join(bins)}: pickled weights are never loaded; convert them to safetensors, "
                    "e.g. with transformers: model.save_pretrained(dir, safe_serialization=True))") if bins else (
                "; the weights are missing (an unfinished download?): download the model again with its "
                "*.safetensors files")
            raise CheckpointError(f"{self.path}: no *.safetensors files{hint}")
        index = self.path / "model.safetensors.index.json"
        self.where: dict[str, Path] = {}
        if index.exists():
            wm = _weight_map(index)
            absent = sorted({fn for fn in wm.values() if not (self.path / fn).exists()})
            if absent:
                raise CheckpointError(
                    f"{index}: names {len(absent)} shard file(s) that are not in {self.path} ({', '.join(absent[:3])}"
                    f"{', ...' if len(absent) > 3 else ''}; {len(set(wm.values()))} named in all): an unfinished "
                    "download? Download the missing files too (or the model again)")
            self.where = {name: self.path / fn for name, fn in wm.items()}
        else:
            for p in files:
                with _open(p) as f:
                    for name in f.keys():
                        self.where[name] = p
        self._handles: dict[Path, object] = {}
        self.used: set[str] = set()

    def _handle(self, p: Path):
        if p not in self._handles:
            f = _open(p)
            held = set(f.keys())
            absent = sorted(n for n, where in self.where.items() if where == p and n not in held)
            if absent:
                more = f" and {len(absent) - 3} more" if len(absent) > 3 else ""
                shown = ", ".join(repr(n) for n in absent[:3]) + more
                raise CheckpointError(
                    f"{self.path / 'model.safetensors.index.json'}: maps {shown} to {p.name}, which does not hold "
                    f"{'it' if len(absent) == 1 else 'them'}; the index and the shards are from different downloads "
                    "or saves: download the model again (index and every shard)")
            self._handles[p] = f
        return self._handles[p]

    def has(self, name: str) -> bool:
        return name in self.where

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(self.where[name]).get_slice(name).get_shape())

    def dtype(self, name: str) -> str:
        """The stored dtype of tensor `name`, as safetensors names it ("F32", "BF16", "I8", ...)."""
        return self._handle(self.where[name]).get_slice(name).get_dtype()

    def read(self, name: str, idx: tuple[slice, ...]) -> np.ndarray:
        """Read only `idx` of tensor `name` (in its on-disk layout)."""
        self.used.add(name)
        return self._handle(self.where[name]).get_slice(name)[idx]

    def file_of(self, name: str) -> str:
        return str(self.where.get(name, self.path))


# --------------------------------------------------------------------------- #
# Mapping: declared parameters -> on-disk tensors
# --------------------------------------------------------------------------- #

@dataclasses.dataclass(frozen=True)
class Tensors:
    """Where one parameter lives on disk: one of its declared layouts, under one naming."""

    entry: Entry
    layout: HFLayout
    shape: tuple[int, ...]  # our per-layer shape
    naming: tuple[tuple[str, str], ...]  # the family's renames (see `Family.hf_aliases`)
    num_layers: int

    @property
    def layers(self) -> range:
        return range(self.num_layers if self.entry.stacked else 1)

    def names(self, layer: int) -> list[str]:
        names = self.layout.names(self.entry.prefix.replace("{l}", str(layer)), self.shape)
        for old, new in self.naming:
            names = [n.replace(old, new) for n in names]
        return names

    def read(self, r: "TensorReader", layer: int, idx: tuple[slice, ...]) -> np.ndarray:
        return self.layout.read(r.read, self.names(layer), self.shape, idx)


def parameter_tensors(model: CausalLM, r: TensorReader | None) -> list[Tensors]:
    """Every parameter of `model` with the on-disk tensors it reads from (or is written to).

    With a reader, each parameter takes the first declared layout whose layer-0 tensors
    exist with the expected shape, under the family's first naming in which every
    parameter finds one; without, the layout and naming we write.
    """
    cfg = model.config
    shapes = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    items = [(e, tuple(shapes[e.key].shape[1:] if e.stacked else shapes[e.key].shape)) for e in entries(model)]
    namings = FAMILIES[cfg.model_type].hf_aliases + ((),)

    def at(e, shape, layout, naming):
        return Tensors(e, layout, shape, naming, cfg.num_layers)

    if r is None:
        return [at(e, shape, e.decl.hf[0], namings[0]) for e, shape in items]

    def choose(e, shape, naming):
        present = [t for t in (at(e, shape, lay, naming) for lay in e.decl.hf) if all(map(r.has, t.names(0)))]
        fitting = [t for t in present if r.shape(t.names(0)[0]) == t.layout.hf_shape(shape)]
        return (fitting or present or [None])[0]

    for naming in namings:
        chosen = [choose(e, shape, naming) for e, shape in items]
        if all(chosen):
            return chosen
    # Nothing fits everywhere: the canonical names, so that the check names what is missing.
    return [t or at(e, shape, e.decl.hf[0], ()) for t, (e, shape) in zip(chosen, items)]


def _check_tensors(cfg: ModelConfig, tensors: list[Tensors], r: TensorReader, config_path: str):
    for t in tensors:
        shape = t.layout.hf_shape(t.shape)
        for l in t.layers:
            for name in t.names(l):
                if not r.has(name):
                    raise CheckpointError(
                        f"{r.path}: tensor {name!r} is missing (needed for {'.'.join(t.entry.key)} of a "
                        f"{cfg.model_type} model as described by {config_path}); the checkpoint is incomplete "
                        "or config.json belongs to another model")
                if r.dtype(name) not in _FLOAT_DTYPES:
                    raise CheckpointError(
                        f"{r.file_of(name)}: tensor {name!r} is stored as {r.dtype(name)}, not as floating point "
                        "(a quantized checkpoint?); its values are not the weights, and neurons counted on them "
                        "would mean nothing. Use the model's float16 / bfloat16 / float32 release")
                got = r.shape(name)
                if tuple(got) != shape:
                    raise CheckpointError(
                        f"{r.file_of(name)}: tensor {name!r} has shape {tuple(got)} but {config_path} implies "
                        f"{shape} (hidden_size={cfg.hidden_size}, heads={cfg.num_heads}/{cfg.num_kv_heads}, "
                        f"head_dim={cfg.head_dim}, intermediate={cfg.intermediate_size or cfg.moe_intermediate_size}, "
                        f"experts={cfg.num_experts}, vocab={cfg.vocab_size}); the config disagrees with the weights")
    expected = {n for t in tensors for l in t.layers for n in t.names(l)}
    extra = [n for n in r.where if n not in expected and not n.endswith(_IGNORED_SUFFIXES)
             and not (cfg.tie_word_embeddings and n == "lm_head.weight")]
    if extra:
        shown = ", ".join(sorted(extra)[:8]) + (" ..." if len(extra) > 8 else "")
        raise CheckpointError(
            f"{r.path}: {len(extra)} unexpected tensor(s) not used by a {cfg.model_type} model per {config_path}: "
            f"{shown}. The config may not match the weights (e.g. wrong num_hidden_layers or model_type).")


def check_checkpoint(path: str | Path) -> ModelConfig:
    """What `load_model` checks before it reads a weight, without reading one: config.json, the
    weights files, and every tensor's name, dtype and shape against config.json (safetensors
    headers only), for a check of every model before any work (`pipeline.check_model_dirs`).

    Raises:
      ConfigError, CheckpointError: as `load_model` would, naming the file and field or tensor.
    """
    p = Path(path)
    cfg = ModelConfig.from_pretrained(p)
    r = TensorReader(p)
    _check_tensors(cfg, parameter_tensors(abstract_model(cfg), r), r, str(p / "config.json"))
    return cfg


def load_params(model: CausalLM, path: str | Path, *, mesh=None, rules=None) -> None:
    """Fill `model` (possibly abstract) in place with the weights of HF directory `path`."""
    from sparcom_jax.parallel.sharding import param_shardings

    cfg = model.config
    r = TensorReader(Path(path))
    tensors = parameter_tensors(model, r)
    _check_tensors(cfg, tensors, r, str(Path(path) / "config.json"))
    state = nnx.state(model, nnx.Param)
    flat = dict(nnx.to_flat_state(state))
    flat_sh = param_shardings(state, mesh=mesh, rules=rules)
    for t in tensors:
        var, sh = flat[t.entry.key], flat_sh[t.entry.key]
        dtype = var.dtype

        def reader(layer, shape):
            return lambda idx: np.asarray(t.read(r, layer, _norm(idx, shape)), dtype=dtype)

        if not t.entry.stacked:
            var.set_value(jax.make_array_from_callback(t.shape, sh, reader(0, t.shape)))
            continue
        # One layer at a time: host staging memory stays one layer's slice, whatever the depth.
        layer_sh = jax.sharding.NamedSharding(sh.mesh, jax.sharding.PartitionSpec(*tuple(sh.spec)[1:])) \
            if isinstance(sh, jax.sharding.NamedSharding) else sh
        stacked = jnp.zeros(var.shape, dtype, device=sh)
        setter = _layer_setter(sh)
        for l in t.layers:
            stacked = setter(stacked, jax.make_array_from_callback(t.shape, layer_sh, reader(l, t.shape)), l)
        var.set_value(stacked)
    nnx.update(model, nnx.from_flat_state(flat))


_SETTERS: dict = {}


def _layer_setter(sharding):
    if sharding not in _SETTERS:
        _SETTERS[sharding] = jax.jit(
            lambda stacked, layer, l: jax.lax.dynamic_update_index_in_dim(stacked, layer, l, 0),
            donate_argnums=0, out_shardings=sharding)
    return _SETTERS[sharding]


def has_tokenizer(path: str | Path) -> bool:
    """Whether the directory holds tokenizer files AutoTokenizer can load."""
    return any((Path(path) / f).exists() for f in ("tokenizer.json", "tokenizer.model", "vocab.json"))


def load_tokenizer(path: str | Path):
    """The directory's tokenizer through transformers' AutoTokenizer (offline), or None if it has none."""
    p = Path(path)
    if not has_tokenizer(p):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    except Exception as e:  # transformers / tokenizers raise OSError, ValueError, JSON and bare Exceptions
        why = " ".join(str(e).split()) or type(e).__name__
        raise CheckpointError(
            f"{p}: its tokenizer cannot be loaded ({why[:300]}); a tokenizer file (or the config.json "
            "transformers reads with it) is damaged or from another model: download the model's tokenizer "
            f"files again ({', '.join(TOKENIZER_FILES[:3])}, ...) together with config.json") from e


def load_model(path: str | Path, dtype="float32", mesh=None, *, param_dtype=None, rules=None,
               with_tokenizer: bool = True, moe_impl="auto", gate_dtype=None) -> CausalLM:
    """Load a Hugging Face causal-LM directory into a Flax model.

    Args:
      path: directory with config.json and *.safetensors (optionally sharded with
        model.safetensors.index.json) and, optionally, tokenizer files.
      dtype: compute dtype, "float32" or "bfloat16".
      mesh: optional `jax.sharding.Mesh` with axes ("data", "model"); parameters are
        created already sharded by the sharding rules.
      param_dtype: storage dtype of parameters (default: `dtype`).
      rules: optional logical-axis rules overriding the defaults.
      moe_impl: expert dispatch ("auto", "capacity", "ragged", "grouped", "tiled",
        "looped", or a `Dispatch` with tuned constants); see `CausalLM`.
      gate_dtype: None, or "float32": the gate projections in float32 in a bfloat16
        model; see `CausalLM` (with bfloat16 weights it cannot undo their rounding:
        pass ``param_dtype="float32"`` for that).

    Returns:
      CausalLM; ``model.tokenizer`` is the directory's tokenizer or None and
      ``model.source_path`` the directory.
    """
    ensure_compilation_cache()
    check_mesh(mesh, "load_model")
    p = Path(path)
    if not p.is_dir():
        raise CheckpointError(f"{p}: not a directory; pass a Hugging Face model directory (config.json + *.safetensors)")
    cfg = ModelConfig.from_pretrained(p)
    model = abstract_model(cfg, dtype=dtype, param_dtype=param_dtype, moe_impl=moe_impl, gate_dtype=gate_dtype)
    load_params(model, p, mesh=mesh, rules=rules)
    model.tokenizer = load_tokenizer(p) if with_tokenizer else None
    model.source_path = str(p)
    return model


# --------------------------------------------------------------------------- #
# Saving
# --------------------------------------------------------------------------- #

def hf_state_dict(model: CausalLM) -> dict[str, np.ndarray]:
    """Our parameters as HF-named numpy tensors, each in its first declared layout (per-expert
    tensors and the family's first naming, as transformers' save_pretrained writes them)."""
    flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    out: dict[str, np.ndarray] = {}
    for t in parameter_tensors(model, None):
        value = np.asarray(jax.device_get(flat[t.entry.key].get_value()))
        for l in t.layers:
            out.update(zip(t.names(l), t.layout.to_hf(value[l] if t.entry.stacked else value)))
    return out


def save_model(model: CausalLM, path: str | Path, *, tokenizer=None, dtype: str | None = None) -> Path:
    """Write `model` as a Hugging Face directory that transformers loads unchanged.

    Writes config.json, model.safetensors and the tokenizer files (from `tokenizer`
    or ``model.tokenizer``; for a model not loaded from a directory, a random one, the
    shipped tokenizer its collections use, so that it loads back usable). The directory
    appears atomically: everything is written to a temporary sibling first, then renamed.
    """
    from safetensors.numpy import save_file

    path = Path(path)
    with atomic_dir(path) as tmp:
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
        if tok is None and not getattr(model, "source_path", None):
            from sparcom_jax.data import resolve_tokenizer

            tok = resolve_tokenizer(model)  # (the shipped one: the model's display names it)
        if tok is not None:
            tok.save_pretrained(str(tmp))
    return path

