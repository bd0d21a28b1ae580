"""The optax optimizer: clipping, warm-up + cosine schedule, decoupled weight decay with a mask."""

from __future__ import annotations

import jax
import optax

from sparcom_jax.models.params import declaration
from sparcom_jax.models.transformer import CausalLM
from sparcom_jax.train.config import TrainConfig


def _path_names(path) -> list[str]:
    return [str(getattr(k, "key", getattr(k, "name", k))) for k in path]


def decay_mask(params):
    """bool pytree like `params` (a CausalLM's): True where its declaration says weight decay applies.

    Raises:
      KeyError: for a parameter no module declares.
    """
    return jax.tree_util.tree_map_with_path(lambda p, _: declaration(CausalLM, _path_names(p)).decay, params)


def lr_schedule(cfg: TrainConfig, total_steps: int) -> optax.Schedule:
    """Linear warm-up from 0 to the peak, then cosine decay to peak * end_lr_fraction at `total_steps`."""
    end = cfg.learning_rate * cfg.end_lr_fraction
    if cfg.warmup_steps == 0:
        return optax.cosine_decay_schedule(cfg.learning_rate, total_steps, alpha=cfg.end_lr_fraction)
    return optax.warmup_cosine_decay_schedule(0.0, cfg.learning_rate, cfg.warmup_steps,
                                              max(total_steps, cfg.warmup_steps + 1), end)


def make_optimizer(cfg: TrainConfig, total_steps: int, *, learning_rate: optax.Schedule | None = None,
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The gradient transformation for `cfg` and its learning-rate schedule.

    The gradient is clipped by global norm first (before the moments see it), then
    the optimizer applies the schedule and the masked decoupled weight decay.
    `learning_rate` (step count -> rate) replaces the schedule in the transformation
    (same state structure): the train step passes each step's rate in
    (`sparcom_jax.train.step.make_train_step`'s `tx_at`).
    """
    sched = lr_schedule(cfg, total_steps)
    rate = sched if learning_rate is None else learning_rate
    if cfg.optimizer == "adamw":
        opt = optax.adamw(rate, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                          mask=decay_mask)
    elif cfg.optimizer == "lion":
        opt = optax.lion(rate, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay, mask=decay_mask)
    elif cfg.optimizer == "sgd":
        opt = optax.chain(
            optax.trace(decay=cfg.b1) if cfg.b1 > 0 else optax.identity(),
            optax.add_decayed_weights(cfg.weight_decay, mask=decay_mask),
            optax.scale_by_learning_rate(rate),
        )
    else:  # TrainConfig.validate rejects these first; kept for direct callers
        raise ValueError(f"optimizer={cfg.optimizer!r} is not supported")
    parts = [optax.clip_by_global_norm(cfg.clip_norm)] if cfg.clip_norm else []
    return optax.chain(*parts, opt), sched
