"""The jitted train and eval steps, with explicit shardings and a donated train state.

Axis letters: see `sparcom_jax.axes`.

Parameters are a plain nested dict (``nnx.to_pure_dict``) of float32 master
weights. The forward runs through a graph definition built for the compute
dtype: its layers cast each weight to that dtype where they use it, so with
``compute_dtype="bfloat16"`` the matmuls run in bfloat16 while gradients,
optimizer moments and updates stay float32 (mixed precision without a second
copy of the weights).

Sharding: parameters and optimizer moments follow `FSDP_RULES` (model width over
the data axis, neurons/heads over the model axis), every micro-batch is split
over the data axis, and scalars are replicated. On a 1x1 mesh this is plain
single-device code.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx, traverse_util
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from sparcom_jax.models.config import ModelConfig
from sparcom_jax.models.transformer import CausalLM, abstract_model
from sparcom_jax.next_token import next_token_loss
from sparcom_jax.parallel.sharding import FSDP_RULES, param_shardings, with_mesh


class TrainState(NamedTuple):
    """Everything that changes during training (a pytree).

    Attributes:
      step: int32 scalar, optimizer updates applied so far.
      params: nested dict of float32 arrays (the master weights).
      opt_state: the optax state (moments sharded like `params`).
    """

    step: Any
    params: Any
    opt_state: Any


def pure_params(model: CausalLM) -> dict:
    """The model's parameters as a nested dict of arrays (paths like ``blocks/attn/q_proj``)."""
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def compute_graphdef(cfg: ModelConfig, compute_dtype: str):
    """Graph definition of a model that computes in `compute_dtype` on float32 parameters."""
    return nnx.graphdef(abstract_model(cfg, dtype=compute_dtype, param_dtype="float32"))


def abstract_params(cfg: ModelConfig) -> dict:
    """float32 parameters as ShapeDtypeStructs (no memory)."""
    return nnx.to_pure_dict(nnx.state(abstract_model(cfg, dtype="float32"), nnx.Param))


def merge_params(graphdef, params: dict) -> CausalLM:
    return nnx.merge(graphdef, nnx.State(params))


class Shardings(NamedTuple):
    """Shardings of the train state, a micro-batched batch [A, B, T], an eval batch [B, T] and scalars."""

    state: TrainState
    batch_ABT: NamedSharding
    batch_BT: NamedSharding
    replicated: NamedSharding


def master_shardings(cfg: ModelConfig, mesh: Mesh, rules: dict | None = None) -> dict:
    """Shardings of the float32 master weights on `mesh` (FSDP rules by default): the train
    state's `params`, as a nested dict like `pure_params`."""
    rules = FSDP_RULES if rules is None else rules
    flat = param_shardings(nnx.state(abstract_model(cfg, dtype="float32"), nnx.Param), mesh, rules)
    return traverse_util.unflatten_dict({tuple(map(str, k)): v for k, v in flat.items()})


def make_shardings(cfg: ModelConfig, tx: optax.GradientTransformation, mesh: Mesh,
                   rules: dict | None = None) -> Shardings:
    """Shardings for the train state on `mesh` (FSDP rules by default)."""
    params_sh = master_shardings(cfg, mesh, rules)
    replicated = NamedSharding(mesh, P())
    abs_params = abstract_params(cfg)
    abs_opt = jax.eval_shape(tx.init, abs_params)
    # Moments have the parameters' shapes and take their shardings; counters are replicated.
    opt_sh = optax.tree_map_params(tx, lambda _, sh: sh, abs_opt, params_sh,
                                   transform_non_params=lambda _: replicated)
    return Shardings(TrainState(replicated, params_sh, opt_sh),
                     NamedSharding(mesh, P(None, "data", None)), NamedSharding(mesh, P("data", None)),
                     replicated)


def abstract_state(cfg: ModelConfig, tx: optax.GradientTransformation, sh: Shardings) -> TrainState:
    """The train state as sharded ShapeDtypeStructs (the restore target)."""
    params = abstract_params(cfg)
    shapes = TrainState(jax.ShapeDtypeStruct((), jnp.int32), params, jax.eval_shape(tx.init, params))
    return jax.tree.map(lambda s, shd: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=shd), shapes, sh.state)


def init_state(params: dict, tx: optax.GradientTransformation, sh: Shardings) -> TrainState:
    """A fresh train state from (possibly low-precision, unsharded) model parameters.

    The jit makes new buffers, so donating the state later never invalidates the
    caller's model.
    """
    params = jax.device_put(params, sh.state.params)

    def init(p):
        p = jax.tree.map(lambda x: x.astype(jnp.float32), p)
        return TrainState(jnp.zeros((), jnp.int32), p, tx.init(p))

    return jax.jit(init, out_shardings=sh.state)(params)


def token_losses(graphdef, params: dict, ids_BT, mask_BT, targets_BT):
    """Per-row loss sums and target counts of the model `graphdef` with `params` (`next_token_loss`).

    Args:
      targets_BT: bool [B, T] prediction positions (`sparcom_jax.next_token.target_mask`).

    Returns:
      loss_B float32 [B] and n_B float32 [B], as `next_token_loss`.
    """
    logits_BTV = merge_params(graphdef, params).forward(ids_BT, mask_BT).logits
    return next_token_loss(logits_BTV, ids_BT, targets_BT)


def make_train_step(graphdef, tx: optax.GradientTransformation, sh: Shardings,
                    schedule: optax.Schedule | None = None, *,
                    tx_at: Callable[[Any], optax.GradientTransformation] | None = None) -> Callable:
    """jit(train_step)(state, ids_ABT, mask_ABT, targets_ABT) -> (state, metrics); the state is donated.

    Metrics: loss (per target token), grad_norm (before clipping), targets (count)
    and, with `schedule` or `tx_at`, lr (the learning rate this update used).

    Gradients of the summed token loss are accumulated over the A micro-batches
    by a `lax.scan` (one compiled body, whatever A), then divided by the number
    of target tokens of the whole step: the loss is a per-token mean over the
    global batch, identical for any split into micro-batches or devices.

    With `tx_at` (learning rate -> the optimizer scaling by it, `make_optimizer(...,
    learning_rate=...)`), the step takes this update's learning rate as an input:
    jit(train_step)(state, lr, ids_ABT, mask_ABT, targets_ABT), lr a float32 scalar (the
    schedule's value at the optimizer's step). The program then holds no schedule: runs that
    differ only in learning_rate, warmup_steps, total_steps or end_lr_fraction compile the
    same program (the persistent compilation cache gives it to the second), e.g. the demo's
    pretraining and fine-tuning. `tx` still gives the optimizer state's structure.
    """

    def train_step(state: TrainState, ids_ABT, mask_ABT, targets_ABT):
        return _step(state, None, ids_ABT, mask_ABT, targets_ABT)

    def rated_step(state: TrainState, lr, ids_ABT, mask_ABT, targets_ABT):
        return _step(state, lr, ids_ABT, mask_ABT, targets_ABT)

    def _step(state: TrainState, lr, ids_ABT, mask_ABT, targets_ABT):
        def micro(carry, xs):
            g_acc, l_acc, n_acc = carry
            ids, mask, tgt = xs

            def summed(p):
                l_B, n_B = token_losses(graphdef, p, ids, mask, tgt)
                return l_B.sum(), n_B.sum()

            (l, n), g = jax.value_and_grad(summed, has_aux=True)(state.params)
            return (jax.tree.map(jnp.add, g_acc, g), l_acc + l, n_acc + n), None

        zeros = jax.lax.with_sharding_constraint(jax.tree.map(jnp.zeros_like, state.params), sh.state.params)
        init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
        (g, l, n), _ = jax.lax.scan(micro, init, (ids_ABT, mask_ABT, targets_ABT))
        denom = jnp.maximum(n, 1.0)  # a step without targets gives a zero gradient, not NaN
        g = jax.tree.map(lambda x: x / denom, g)
        grad_norm = optax.global_norm(g)
        updates, opt_state = (tx if lr is None else tx_at(lr)).update(g, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": l / denom, "grad_norm": grad_norm, "targets": n}
        if lr is not None:
            metrics["lr"] = lr
        elif schedule is not None:  # in-graph: no eager schedule ops (and compiles) on the host
            metrics["lr"] = jnp.asarray(schedule(state.step), jnp.float32)
        return TrainState(state.step + 1, params, opt_state), metrics

    # Traced under the mesh (`with_mesh`): an MoE layer routes each data shard's rows apart.
    if tx_at is None:
        return jax.jit(with_mesh(train_step, sh.replicated.mesh),
                       in_shardings=(sh.state, sh.batch_ABT, sh.batch_ABT, sh.batch_ABT),
                       out_shardings=(sh.state, sh.replicated), donate_argnums=0)
    rated_step.__name__ = "train_step"  # the program's name in logs, profiles and the compilation cache
    return jax.jit(with_mesh(rated_step, sh.replicated.mesh),
                   in_shardings=(sh.state, sh.replicated, sh.batch_ABT, sh.batch_ABT, sh.batch_ABT),
                   out_shardings=(sh.state, sh.replicated), donate_argnums=0)


def make_eval_step(graphdef, sh: Shardings) -> Callable:
    """jit(eval_step)(params, ids_BT, mask_BT, targets_BT) -> (loss_B, n_B), replicated."""

    def eval_step(params, ids_BT, mask_BT, targets_BT):
        return token_losses(graphdef, params, ids_BT, mask_BT, targets_BT)

    return jax.jit(with_mesh(eval_step, sh.replicated.mesh),
                   in_shardings=(sh.state.params, sh.batch_BT, sh.batch_BT, sh.batch_BT),
                   out_shardings=(sh.replicated, sh.replicated))

