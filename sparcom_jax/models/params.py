"""Parameters declared once, beside the module that owns them.

Every module class lists its parameters in ``PARAMS`` (name -> `ParamDecl`) and its
sub-modules in ``CHILDREN`` (attribute -> HF name and the classes it may hold). One
declaration states a parameter's logical axes, its Hugging Face tensor(s) with the
layout in each direction, its initialiser and whether weight decay applies. From it:

- the module creates the parameter (`ParamDecl.make`), with the logical axes kept as
  the variable's ``out_sharding`` metadata (``nnx.vmap`` prepends ``layers``), so
  `sparcom_jax.parallel.sharding` shards it from the state alone;
- `sparcom_jax.checkpoints.hf` reads and writes it (`HFLayout.read` / `HFLayout.to_hf`);
- `sparcom_jax.train.optim` masks weight decay (`declaration`).

A parameter without a declaration is an error everywhere, never silently replicated.
Axis letters: see `sparcom_jax.axes`; logical axis names are those of
`sparcom_jax.parallel.sharding`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.custom_batching import custom_vmap

INIT_STD = 0.02
AXES_KEY = "out_sharding"  # where flax keeps a variable's axis names (nnx.vmap extends it)


@dataclasses.dataclass(frozen=True)
class HFLayout:
    """One on-disk arrangement of a parameter (per layer) as Hugging Face tensor(s).

    Attributes:
      name: tensor name relative to the owning module's HF prefix; ``{e}`` marks one
        tensor per index of our axis `split` (per-expert layouts).
      axes: for each HF axis, our axes merged into it (row-major, outer first); our
        axes are numbered with `split` included.
      split: our axis stored as separate tensors, or None.
      part: (HF axis, index, count): this parameter is block `index` of `count` equal
        blocks concatenated along that HF axis (fused gate/up projections), or None.
    """

    name: str
    axes: tuple[tuple[int, ...], ...]
    split: int | None = None
    part: tuple[int, int, int] | None = None

    def names(self, prefix: str, shape: tuple[int, ...]) -> list[str]:
        """The HF tensor names of one layer (`shape`: our per-layer shape)."""
        full = prefix + self.name
        return [full] if self.split is None else [full.format(e=e) for e in range(shape[self.split])]

    def hf_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """On-disk shape of each tensor for our per-layer `shape`."""
        out = [math.prod(shape[a] for a in group) for group in self.axes]
        if self.part is not None:
            out[self.part[0]] *= self.part[2]
        return tuple(out)

    def read(self, read_hf: Callable, names: list[str], shape: tuple[int, ...], idx: tuple[slice, ...]):
        """Our slice `idx` (normalised slices, one per axis of `shape`), reading only what it needs.

        `read_hf(name, hf_index)` returns a numpy slice of one HF tensor. A merged HF
        axis is read over the range of its outer axis' slice (inner axes whole), so a
        shard over heads reads only its heads' rows.
        """
        if self.split is not None:
            s = idx[self.split]
            return np.stack([self._read_one(read_hf, names[e], shape, idx) for e in range(s.start, s.stop)],
                            axis=self.split)
        return self._read_one(read_hf, names[0], shape, idx)

    def _read_one(self, read_hf, name, shape, idx):
        hf_idx, unmerged = [], []
        for j, group in enumerate(self.axes):
            inner = math.prod(shape[a] for a in group[1:])
            lo, hi = idx[group[0]].start * inner, idx[group[0]].stop * inner
            if self.part is not None and self.part[0] == j:
                offset = self.part[1] * math.prod(shape[a] for a in group)
                lo, hi = lo + offset, hi + offset
            hf_idx.append(slice(lo, hi))
            unmerged += [idx[group[0]].stop - idx[group[0]].start] + [shape[a] for a in group[1:]]
        order = [a for group in self.axes for a in group]
        arr = np.asarray(read_hf(name, tuple(hf_idx))).reshape(unmerged).transpose(np.argsort(order))
        outer = {group[0] for group in self.axes}
        return arr[tuple(slice(None) if a in outer else idx[a] for a in sorted(order))]

    def to_hf(self, value: np.ndarray) -> list[np.ndarray]:
        """Our per-layer value -> the HF tensor(s) (for a `part`, this parameter's block)."""
        if self.split is None:
            return [self._to_one(value, self.axes)]
        axes = tuple(tuple(a - (a > self.split) for a in group) for group in self.axes)
        return [self._to_one(np.take(value, e, axis=self.split), axes) for e in range(value.shape[self.split])]

    @staticmethod
    def _to_one(value, axes):
        order = [a for group in axes for a in group]
        shape = [math.prod(value.shape[a] for a in group) for group in axes]
        return np.ascontiguousarray(value.transpose(order).reshape(shape))


def same(name: str, ndim: int = 1) -> HFLayout:
    """Stored as is (norm scales, the embedding)."""
    return HFLayout(name, tuple((a,) for a in range(ndim)))


def linear(name: str) -> HFLayout:
    """A torch Linear weight [out, in] for our [in, out]."""
    return HFLayout(name, ((1,), (0,)))


@dataclasses.dataclass(frozen=True)
class ParamDecl:
    """One parameter: logical axes (its shape, by name), HF layouts, initialiser, weight decay.

    Attributes:
      axes: logical axis name of each dimension (without the stacked ``layers`` axis).
      hf: on-disk layouts; the first is the one written, all are accepted when reading.
      init: "normal" (std `INIT_STD`), "ones" or "zeros".
      decay: whether weight decay applies. Norm scales and biases are exempt: decaying a
        scale towards 0 (not its initial 1) shrinks the layer, and biases are offsets.
    """

    axes: tuple[str, ...]
    hf: tuple[HFLayout, ...]
    init: str = "normal"
    decay: bool = True

    def make(self, rngs: nnx.Rngs | None, sizes: dict[str, int], param_dtype) -> nnx.Param:
        """A new parameter of shape ``[sizes[a] for a in axes]`` carrying its logical axes."""
        shape = tuple(sizes[a] for a in self.axes)
        if self.init == "normal":
            value = normal_sampler(shape, jnp.dtype(param_dtype))(rngs.params())
        else:
            value = (jnp.ones if self.init == "ones" else jnp.zeros)(shape, param_dtype)
        return nnx.Param(value, eager_sharding=False, **{AXES_KEY: self.axes})


@functools.lru_cache(maxsize=None)
def normal_sampler(shape: tuple[int, ...], dtype) -> Callable:
    """key -> normal(0, `INIT_STD`) sample of `shape` in `dtype`, one layer at a time when stacked.

    The sample is float32 normals cast to `dtype` (the values every version of this
    package has drawn for a seed). Where the stacked layers are created (`nnx.vmap` over
    one key per layer) the batched draw would hold the whole stack as float32, plus the
    random-bit temporaries, before the cast: 56 GiB for Mixtral-8x7B's stacked expert
    weights. The batching rule draws the layers one after another instead (`lax.map`,
    the same values), so at most one layer of one parameter exists in float32.
    """
    @custom_vmap
    def sample(key):
        # The barrier keeps XLA from folding the scale into the sampler's last product
        # under jit, which moves float32 values by an ulp: the draw stays that of an
        # eager `jax.random.normal`, bit for bit.
        draw = jax.lax.optimization_barrier(jax.random.normal(key, shape, jnp.float32))
        return jax.lax.optimization_barrier(draw.astype(dtype) * INIT_STD)

    @sample.def_vmap
    def per_layer(axis_size, in_batched, key):
        if not in_batched[0]:
            return sample(key), False
        return jax.lax.map(sample, key), True

    return sample


def bias(name: str, axes: tuple[str, ...], hf_axes=None) -> ParamDecl:
    return ParamDecl(axes, (HFLayout(name, hf_axes or (tuple(range(len(axes))),)),), init="zeros", decay=False)


def norm_scale(name: str) -> ParamDecl:
    return ParamDecl(("norm",), (same(name),), init="ones", decay=False)


def create(module, names, rngs, sizes: dict[str, int], param_dtype) -> None:
    """Create the declared parameters `names` of `module` (in this order: it fixes the rng stream)."""
    for name in names:
        setattr(module, name, type(module).PARAMS[name].make(rngs, sizes, param_dtype))


def logical_axes(path: tuple, var) -> tuple[str | None, ...]:
    """Logical axis names of a parameter variable (as declared, ``layers`` first when stacked).

    Raises:
      KeyError: for a parameter made without a declaration.
    """
    axes = var.get_metadata().get(AXES_KEY) if hasattr(var, "get_metadata") else None
    if axes is None or len(axes) != len(var.shape):
        raise KeyError(f"parameter {'.'.join(map(str, path))} has no declared logical axes; declare it in its "
                       "module's PARAMS (sparcom_jax.models.params)")
    return tuple(axes)


def declaration(root: type, path: tuple) -> ParamDecl:
    """The declaration of the parameter at `path` (a flat state key), found through the classes alone.

    Where a child may hold one of several classes (a dense or an MoE FFN), the ones
    declaring this name must agree on everything but the HF layouts and shape.

    Raises:
      KeyError: when no module class declares it, or the candidates disagree.
    """
    path = tuple(str(p) for p in path)
    classes = [root]
    for name in path[:-1]:
        classes = [c for cls in classes for c in getattr(cls, "CHILDREN", {}).get(name, (None,))[1:]]
    found = [cls.PARAMS[path[-1]] for cls in classes if path[-1] in getattr(cls, "PARAMS", {})]
    if not found:
        raise KeyError(f"no declaration for parameter {'.'.join(path)}; declare it in its module's PARAMS")
    if len({d.decay for d in found}) > 1:
        raise KeyError(f"parameter {'.'.join(path)}: its possible declarations disagree on weight decay")
    return found[0]


@dataclasses.dataclass(frozen=True)
class Entry:
    """A parameter of a model instance with its declaration and HF name prefix."""

    key: tuple           # flat state key
    decl: ParamDecl
    prefix: str          # HF name prefix of the owning module ("{l}" marks the layer)
    stacked: bool        # has a leading layers axis


def entries(model) -> list[Entry]:
    """Every parameter of `model` (a module instance) with its declaration, in declaration
    order within each module.

    Raises:
      KeyError: for a parameter whose module does not declare it.
    """
    nodes = dict(nnx.iter_graph(model))
    out = []
    for key, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        owner = nodes[tuple(key[:-1])]
        decl = type(owner).PARAMS.get(str(key[-1])) if hasattr(type(owner), "PARAMS") else None
        if decl is None:
            raise KeyError(f"parameter {'.'.join(map(str, key))} is not declared by {type(owner).__name__}.PARAMS")
        prefix = "".join(type(nodes[tuple(key[:i])]).CHILDREN[str(key[i])][0] + "."
                         for i in range(len(key) - 1))
        out.append(Entry(tuple(key), decl, prefix, logical_axes(key, var)[0] == "layers"))
    return sorted(out, key=lambda e: (e.key[:-1], list(type(nodes[e.key[:-1]]).PARAMS).index(e.key[-1])))
