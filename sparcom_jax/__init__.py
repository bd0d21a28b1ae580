"""sparcom_jax: SPARCOM (instruction-specific neurons and experts) in JAX/Flax.

Public API (stable names; see README.md):

    import sparcom_jax as sj
    model = sj.load_model(path, dtype="float32", mesh=None)
    logits = model(input_ids, attention_mask)
    counts = sj.collect_counts(model, sequences, scopes=None, batch_size=8)
    records = sj.load_instructions()          # the shipped six-category set
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# name -> module that defines it; imported on first use so `sparcom --help` stays fast.
_EXPORTS = {
    "ModelConfig": "sparcom_jax.models.config",
    "CausalLM": "sparcom_jax.models.transformer",
    "init_model": "sparcom_jax.models.transformer",
    "abstract_model": "sparcom_jax.models.transformer",
    "load_model": "sparcom_jax.checkpoints.hf",
    "save_model": "sparcom_jax.checkpoints.hf",
    "load_tokenizer": "sparcom_jax.checkpoints.hf",
    "make_mesh": "sparcom_jax.parallel.mesh",
    "Counts": "sparcom_jax.stats.counts",
    "collect_counts": "sparcom_jax.stats.collect",
    "collect_instructions": "sparcom_jax.stats.collect",
    "open_counts": "sparcom_jax.stats.store",
    "CATEGORIES": "sparcom_jax.categories",
    "SHORT_NAMES": "sparcom_jax.categories",
    "normalize_category": "sparcom_jax.categories",
    "Record": "sparcom_jax.data",
    "load_instructions": "sparcom_jax.data",
    "sample_balanced": "sparcom_jax.data",
    "encode_records": "sparcom_jax.data",
    "default_tokenizer": "sparcom_jax.data",
    "IdentifyConfig": "sparcom_jax.analysis",
    "analyze_model": "sparcom_jax.analysis",
    "compare_models": "sparcom_jax.analysis",
    "compare_series": "sparcom_jax.analysis",
    "ablation_matrix": "sparcom_jax.analysis",
    "build_summary": "sparcom_jax.analysis",
    "write_report": "sparcom_jax.report",
    "make_loss_fn": "sparcom_jax.stats.losses",
    "TrainConfig": "sparcom_jax.train",
    "finetune": "sparcom_jax.train",
    "export_series": "sparcom_jax.train",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'sparcom_jax' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
