"""How this process uses JAX: host batches onto devices."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Sharding


def put_batch(x: np.ndarray, sharding: Sharding | None, *, global_batch: bool) -> jax.Array | np.ndarray:
    """Host array -> one global device array; each process copies only the shards of its own devices.

    Args:
      x: the host array; its leading axis holds rows.
      sharding: the target sharding; None leaves `x` on the host (jit moves it to
        the default device).
      global_batch: True when `x` is the whole batch, identical on every process
        (training: a step's batch is a function of the step alone); False when it
        holds only this process's rows (collection: each process brings its own
        share), the global batch being the processes' rows in process order. With
        one process both read the same.
    """
    if sharding is None:
        return x
    return jax.make_array_from_process_local_data(sharding, x, x.shape if global_batch else None)
