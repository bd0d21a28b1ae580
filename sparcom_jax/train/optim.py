"""The optax optimizer: clipping, warm-up + cosine schedule, decoupled weight decay with a mask."""

from __future__ import annotations

import jax
import optax

from sparcom_jax.train.config import TrainConfig


def _path_names(path) -> list[str]:
    return [str(getattr(k, "key", getattr(k, "name", k))) for k in path]


def is_decayed(path_names: list[str]) -> bool:
    """Whether weight decay applies to the parameter at this path.

    Norm scales and biases are left alone: decaying a norm's scale towards 0
    (instead of towards its initial 1) shrinks the layer's output, and biases are
    offsets, not capacities; every codebase from BERT on exempts both.
    """
    leaf = path_names[-1]
    return not (any("norm" in n for n in path_names) or leaf.endswith("bias"))


def decay_mask(params):
    """bool pytree like `params`: True where weight decay applies (see `is_decayed`)."""
    return jax.tree_util.tree_map_with_path(lambda p, _: is_decayed(_path_names(p)), params)


def lr_schedule(cfg: TrainConfig, total_steps: int) -> optax.Schedule:
    """Linear warm-up from 0 to the peak, then cosine decay to peak * end_lr_fraction at `total_steps`."""
    end = cfg.learning_rate * cfg.end_lr_fraction
    if cfg.warmup_steps == 0:
        return optax.cosine_decay_schedule(cfg.learning_rate, total_steps, alpha=cfg.end_lr_fraction)
    return optax.warmup_cosine_decay_schedule(0.0, cfg.learning_rate, cfg.warmup_steps,
                                              max(total_steps, cfg.warmup_steps + 1), end)


def make_optimizer(cfg: TrainConfig, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The gradient transformation for `cfg` and its learning-rate schedule.

    The gradient is clipped by global norm first (before the moments see it), then
    the optimizer applies the schedule and the masked decoupled weight decay.
    """
    sched = lr_schedule(cfg, total_steps)
    if cfg.optimizer == "adamw":
        opt = optax.adamw(sched, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                          mask=decay_mask)
    elif cfg.optimizer == "lion":
        opt = optax.lion(sched, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay, mask=decay_mask)
    elif cfg.optimizer == "sgd":
        opt = optax.chain(
            optax.trace(decay=cfg.b1) if cfg.b1 > 0 else optax.identity(),
            optax.add_decayed_weights(cfg.weight_decay, mask=decay_mask),
            optax.scale_by_learning_rate(sched),
        )
    else:  # TrainConfig.validate rejects these first; kept for direct callers
        raise ValueError(f"optimizer={cfg.optimizer!r} is not supported")
    parts = [optax.clip_by_global_norm(cfg.clip_norm)] if cfg.clip_norm else []
    return optax.chain(*parts, opt), sched
