"""Instruction fine-tuning with optax and orbax: base model -> checkpoints -> tuned model.

    from sparcom_jax.train import TrainConfig, finetune, export_series
    result = finetune(model, records, tokenizer, TrainConfig(total_steps=200), "runs/demo")
    export_series("runs/demo", "runs/demo/hf")   # HF dirs: before, step_..., after

See docs/training.md.
"""

from sparcom_jax import _lazy_exports

# name -> module that defines it; imported on first use, so that reading a config (its `train`
# section is `TrainConfig`, from train.config) imports neither jax nor orbax: `sparcom` took ~4 s
# to report a config error, 3 s of it importing them.
_EXPORTS = {name: f"sparcom_jax.train.{module}" for module, names in {
    "checkpointing": ["TrainCheckpointer", "UnfinishedCheckpointError", "checkpoint_steps", "export_hf",
                      "export_series", "load_checkpoint_model", "read_run", "series_name"],
    "config": ["OPTIMIZERS", "TrainConfig", "TrainConfigError"],
    "loop": ["METRICS_FILE", "FinetuneResult", "check_responses_cut", "finetune", "read_metrics"],
    "optim": ["decay_mask", "lr_schedule", "make_optimizer"],
}.items() for name in names}

__all__ = sorted(_EXPORTS)
__getattr__ = _lazy_exports(globals(), _EXPORTS)
