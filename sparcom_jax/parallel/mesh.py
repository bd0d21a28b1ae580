"""Device meshes with a data axis (batch) and a model axis (neurons, experts, heads).

`mesh_shape` is the one place where a device count is factored into (data, model):
the experiment config's `mesh:` section, the dry-run plan, the pipeline and the
training loop all resolve their mesh through it.
"""

from __future__ import annotations

import numpy as np
import jax
from jax.sharding import Mesh

from sparcom_jax.errors import ConfigError


def mesh_shape(devices: int, data: int | None = None, model: int = 1, num_processes: int = 1,
               prefix: str = "mesh.") -> tuple[int, int]:
    """(data, model) axis sizes for `devices` devices, by arithmetic only.

    Args:
      devices: the device count (of all processes).
      data: the data axis; None = every device not on the model axis.
      model: the model axis.
      num_processes: host processes; must divide the device count.
      prefix: how the settings are named in messages ("mesh." for the experiment
        config, "mesh_" for TrainConfig).

    Raises:
      ConfigError: when the axes do not factor the device count; says which value works.
    """
    n = int(devices)
    if model < 1 or n % model:
        divisors = [d for d in range(1, n + 1) if n % d == 0]
        raise ConfigError(f"{prefix}model={model} does not divide the {n} devices; choose one of {divisors}")
    data = n // model if data is None else data
    if data * model != n:
        raise ConfigError(f"{prefix}data={data} x {prefix}model={model} = {data * model}, but there are {n} "
                          f"devices; set {prefix}data={n // model} or leave it null")
    if num_processes < 1 or n % num_processes:
        raise ConfigError(f"{prefix}num_processes={num_processes} does not divide the {n} devices")
    return data, model


def make_mesh(data: int | None = None, model: int = 1, devices=None) -> Mesh:
    """A ("data", "model") mesh over `devices` (default: all devices of all processes).

    Args:
      data: size of the data axis; None uses every device not taken by `model`.
      model: size of the model axis.
    """
    devices = list(jax.devices() if devices is None else devices)
    data, model = mesh_shape(len(devices), data, model, prefix="mesh ")
    return Mesh(np.asarray(devices).reshape(data, model), ("data", "model"))
