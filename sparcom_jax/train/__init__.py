"""Instruction fine-tuning with optax and orbax: base model -> checkpoints -> tuned model.

    from sparcom_jax.train import TrainConfig, finetune, export_series
    result = finetune(model, records, tokenizer, TrainConfig(total_steps=200), "runs/demo")
    export_series("runs/demo", "runs/demo/hf")   # HF dirs: before, step_..., after

See docs/training.md.
"""

from sparcom_jax.train.checkpointing import (TrainCheckpointer, UnfinishedCheckpointError, checkpoint_steps, export_hf,
                                             export_series, load_checkpoint_model, read_run, series_name)
from sparcom_jax.train.config import OPTIMIZERS, TrainConfig, TrainConfigError
from sparcom_jax.train.loop import METRICS_FILE, FinetuneResult, check_responses_cut, finetune, read_metrics
from sparcom_jax.train.optim import decay_mask, lr_schedule, make_optimizer

__all__ = [
    "METRICS_FILE", "OPTIMIZERS", "FinetuneResult", "TrainCheckpointer", "TrainConfig", "TrainConfigError",
    "UnfinishedCheckpointError",
    "check_responses_cut", "checkpoint_steps", "decay_mask", "export_hf", "export_series", "finetune", "load_checkpoint_model",
    "lr_schedule", "make_optimizer", "read_metrics", "read_run", "series_name",
]
