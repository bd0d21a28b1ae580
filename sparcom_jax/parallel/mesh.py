"""Device meshes with a data axis (batch) and a model axis (neurons, experts, heads)."""

from __future__ import annotations

import numpy as np
import jax
from jax.sharding import Mesh


def make_mesh(data: int | None = None, model: int = 1, devices=None) -> Mesh:
    """A ("data", "model") mesh over `devices` (default: all devices of all processes).

    Args:
      data: size of the data axis; None uses every device not taken by `model`.
      model: size of the model axis.
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    if model < 1 or n % model:
        raise ValueError(f"mesh model axis {model} does not divide the {n} available devices; "
                         f"choose a divisor of {n}")
    data = n // model if data is None else data
    if data * model != n:
        raise ValueError(f"mesh data={data} x model={model} = {data * model} but {n} devices are available; "
                         f"set data={n // model} or leave it empty")
    return Mesh(np.asarray(devices).reshape(data, model), ("data", "model"))
