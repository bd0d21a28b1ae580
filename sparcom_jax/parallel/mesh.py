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


def check_process_rows(devices: int, model: int, num_processes: int, prefix: str = "mesh.") -> None:
    """Refuse, by arithmetic, a model axis that would span processes in a collection.

    Collection feeds every process's own rows into the batch
    (`sparcom_jax.runtime.put_batch`), so each row of the data axis must lie on the
    devices of one process, and the causal check runs each process's passes on a model
    copy on its own devices: either way the model axis must divide the devices of one
    process. Training gives every process the whole batch and has no such limit.

    Raises:
      ConfigError: naming the model-axis sizes that fit.
    """
    if num_processes <= 1:
        return
    local = devices // num_processes
    if local % model:
        fits = [d for d in range(1, local + 1) if local % d == 0]
        raise ConfigError(
            f"{prefix}model={model} spans processes ({num_processes} processes of {local} devices): every process "
            f"counts its own records, so the model axis must lie within one process's devices; set "
            f"{prefix}model to one of {fits} (and {prefix}data=null)")


def process_order(devices) -> list:
    """`devices` with each process's devices together, in process order (stable within a process).

    Reshaped row-major into (data, model), every data row then lies within one process
    whenever the model axis divides a process's device count, whatever order the
    platform lists its devices in.
    """
    return sorted(devices, key=lambda d: d.process_index)


def check_mesh(mesh, where: str) -> None:
    """Refuse a `mesh=` argument that is not a Mesh (e.g. "auto" or a device count), which
    failed deep inside with "'str' object has no attribute 'shape'".

    Raises:
      TypeError: naming `where`, what was given and how to build a mesh.
    """
    if mesh is not None and not isinstance(mesh, Mesh):
        raise TypeError(f"{where}: mesh must be a jax.sharding.Mesh with axes ('data', 'model'), built with "
                        f"sj.make_mesh(data=..., model=...), or None for one device; got {type(mesh).__name__} "
                        f"{mesh!r}")


def make_mesh(data: int | None = None, model: int = 1, devices=None) -> Mesh:
    """A ("data", "model") mesh over `devices` (default: all devices of all processes).

    The devices of each process fill whole rows of the data axis when `model` divides
    a process's device count (`process_order`).

    Args:
      data: size of the data axis; None uses every device not taken by `model`.
      model: size of the model axis.
    """
    devices = process_order(jax.devices() if devices is None else devices)
    data, model = mesh_shape(len(devices), data, model, prefix="mesh ")
    return Mesh(np.asarray(devices).reshape(data, model), ("data", "model"))


def check_rows_in_one_process(mesh: Mesh) -> None:
    """Refuse a mesh with a data row on devices of more than one process (see `check_process_rows`).

    Such a row would hold the same batch rows on two processes, each filling it with its
    own records: the model would mix the two processes' records, silently.

    Raises:
      ConfigError: naming the model-axis sizes that fit.
    """
    if jax.process_count() == 1:
        return
    owners = np.vectorize(lambda d: d.process_index)(mesh.devices)  # [data, model]
    if any(len(set(row)) > 1 for row in owners.reshape(owners.shape[0], -1).tolist()):
        check_process_rows(mesh.devices.size, int(mesh.shape["model"]), jax.process_count(), prefix="mesh.")
        raise ConfigError("mesh: a row of the data axis lies on devices of more than one process; build the "
                          "mesh with sparcom_jax.make_mesh, which keeps each process's devices together")
