"""Sharding in one place: logical axis names on parameters, one rules table onto the mesh.

Every parameter path maps to logical axis names (``layers``, ``vocab``,
``embed``, ``heads``, ``kv_heads``, ``head_dim``, ``mlp``, ``experts``,
``expert_mlp``, ``norm``); a rules table maps logical names to mesh axes
(``data``, ``model``). No mesh means no sharding: one device works unchanged.
A dimension that the mesh axis does not divide is replicated instead.
"""

from __future__ import annotations

import logging

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

log = logging.getLogger(__name__)

# Analysis: weights split over the model axis (neurons, experts, heads); batch over data.
ANALYSIS_RULES: dict[str, str | None] = {
    "mlp": "model", "expert_mlp": None, "experts": "model", "heads": "model", "kv_heads": "model",
    "vocab": "model", "embed": None, "layers": None, "head_dim": None, "norm": None,
}
# Training: additionally shard the model width over data (FSDP-style params and optimizer state).
FSDP_RULES: dict[str, str | None] = {**ANALYSIS_RULES, "embed": "data"}

_LEAF_AXES: dict[tuple[str, ...], tuple[str | None, ...]] = {
    ("embed",): ("vocab", "embed"),
    ("lm_head",): ("embed", "vocab"),
    ("final_norm", "weight"): ("norm",),
    ("input_norm", "weight"): ("norm",),
    ("post_attn_norm", "weight"): ("norm",),
    ("attn", "q_proj"): ("embed", "heads", "head_dim"),
    ("attn", "k_proj"): ("embed", "kv_heads", "head_dim"),
    ("attn", "v_proj"): ("embed", "kv_heads", "head_dim"),
    ("attn", "o_proj"): ("heads", "head_dim", "embed"),
    ("attn", "q_bias"): ("heads", "head_dim"),
    ("attn", "k_bias"): ("kv_heads", "head_dim"),
    ("attn", "v_bias"): ("kv_heads", "head_dim"),
    ("attn", "q_norm"): ("norm",),
    ("attn", "k_norm"): ("norm",),
    ("ffn", "gate_proj"): ("embed", "mlp"),
    ("ffn", "up_proj"): ("embed", "mlp"),
    ("ffn", "down_proj"): ("mlp", "embed"),
    ("shared_expert", "gate_proj"): ("embed", "mlp"),
    ("shared_expert", "up_proj"): ("embed", "mlp"),
    ("shared_expert", "down_proj"): ("mlp", "embed"),
    ("ffn", "shared_expert_gate"): ("embed", None),
    ("ffn", "router"): ("embed", None),
}
_MOE_AXES = {
    "gate_proj": ("experts", "embed", "expert_mlp"),
    "up_proj": ("experts", "embed", "expert_mlp"),
    "down_proj": ("experts", "expert_mlp", "embed"),
}


def logical_axes(path: tuple[str, ...], ndim: int) -> tuple[str | None, ...]:
    """Logical axis names of the parameter at `path` (a flat nnx state key)."""
    path = tuple(str(p) for p in path)
    stacked = path[0] == "blocks"
    base_ndim = ndim - 1 if stacked else ndim
    if path[-2:-1] == ("ffn",) and path[-1] in _MOE_AXES and base_ndim == 3:
        axes = _MOE_AXES[path[-1]]
    else:
        axes = _LEAF_AXES.get(path[-2:]) or _LEAF_AXES.get(path[-1:])
        if axes is None:
            raise KeyError(f"no logical axes for parameter {'.'.join(path)}")
    if len(axes) != base_ndim:
        axes = (None,) * base_ndim  # e.g. full-width q_norm has the same names; keep shapes honest
    return (("layers",) if stacked else ()) + axes


def spec_for(axes, shape, mesh: Mesh, rules: dict) -> P:
    out = []
    used = set()
    for name, dim in zip(axes, shape):
        mesh_axis = rules.get(name) if name else None
        if mesh_axis is None or mesh_axis in used or mesh_axis not in mesh.shape:
            out.append(None)
            continue
        if dim % mesh.shape[mesh_axis] != 0:
            log.info("replicating %s (size %d) instead of sharding over %s (size %d)",
                     name, dim, mesh_axis, mesh.shape[mesh_axis])
            out.append(None)
            continue
        out.append(mesh_axis)
        used.add(mesh_axis)
    return P(*out)


def param_shardings(state, mesh: Mesh | None = None, rules: dict | None = None) -> dict:
    """Sharding for every parameter of an nnx state, keyed like `nnx.to_flat_state(state)`."""
    rules = ANALYSIS_RULES if rules is None else rules
    out = {}
    for key, var in nnx.to_flat_state(state):
        if mesh is None:
            out[key] = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        else:
            axes = logical_axes(key, len(var.shape))
            out[key] = NamedSharding(mesh, spec_for(axes, var.shape, mesh, rules))
    return out


def state_shardings(state, mesh: Mesh | None, rules: dict | None = None):
    """The same shardings arranged as a state tree (for jit in/out shardings)."""
    flat = param_shardings(state, mesh, rules)
    return nnx.from_flat_state([(k, flat[k]) for k, _ in nnx.to_flat_state(state)])


def batch_sharding(mesh: Mesh | None, ndim: int = 2):
    """Sharding of a [B, ...] batch: B over the data axis."""
    if mesh is None:
        return None
    return NamedSharding(mesh, P("data", *([None] * (ndim - 1))))
