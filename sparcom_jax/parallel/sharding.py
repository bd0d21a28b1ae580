"""Sharding in one place: logical axis names on parameters, one rules table onto the mesh.

Every parameter carries the logical axis names its module declares
(`sparcom_jax.models.params`): ``layers``, ``vocab``, ``embed``, ``heads``,
``kv_heads``, ``head_dim``, ``mlp``, ``experts``, ``expert_mlp``, ``route`` (the
router's expert axis), ``unit`` (a size-1 axis) and ``norm``. A rules table maps
each name to a mesh axis (``data``, ``model``) or None. No mesh means no sharding:
one device works unchanged. A dimension that the mesh axis does not divide is
replicated instead (logged); a parameter without declared axes, or an axis name the
rules do not know, is an error.
"""

from __future__ import annotations

import logging

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from sparcom_jax.models.params import logical_axes

log = logging.getLogger(__name__)

# Analysis: weights split over the model axis (neurons, experts, heads); batch over data.
ANALYSIS_RULES: dict[str, str | None] = {
    "mlp": "model", "expert_mlp": None, "experts": "model", "heads": "model", "kv_heads": "model",
    "vocab": "model", "embed": None, "layers": None, "head_dim": None, "norm": None, "route": None, "unit": None,
}
# Training: additionally shard the model width over data (FSDP-style params and optimizer state).
FSDP_RULES: dict[str, str | None] = {**ANALYSIS_RULES, "embed": "data"}

def spec_for(axes, shape, mesh: Mesh, rules: dict) -> P:
    out = []
    used = set()
    for name, dim in zip(axes, shape):
        if name not in rules:
            raise KeyError(f"logical axis {name!r} has no sharding rule; add it to the rules table "
                           f"(known: {', '.join(sorted(rules))})")
        mesh_axis = rules[name]
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
        axes = logical_axes(key, var)  # checked with or without a mesh: undeclared is an error
        if mesh is None:
            out[key] = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        else:
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


def with_mesh(fn, mesh: Mesh | None):
    """`fn` traced under `mesh` (its abstract mesh), so that code that splits work over the
    data axis by hand (the MoE layer, `sparcom_jax.models.moe.data_shards`) sees it; `fn`
    itself without a mesh."""
    if mesh is None:
        return fn

    def traced(*args, **kwargs):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return fn(*args, **kwargs)

    # the program's name in logs, profiles and the compilation cache: the step's own
    traced.__name__ = traced.__qualname__ = getattr(getattr(fn, "func", fn), "__name__", "step")
    return traced
