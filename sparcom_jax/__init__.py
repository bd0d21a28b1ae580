"""sparcom_jax: SPARCOM (instruction-specific neurons and experts) in JAX/Flax.

Public API (stable names; see README.md). A study from Python, cell by cell, is
docs/notebook.md; every name below has its own help():

    import sparcom_jax as sj
    model = sj.load_model(path, dtype="float32", mesh=None)   # or init_model(ModelConfig(...))
    logits = model(input_ids, attention_mask)
    records = sj.load_instructions()          # the shipped six-category set, or your file / dicts
    counts = sj.collect_instructions(model, records, scope="content")   # collect_counts: token ids
    sj.save_counts(counts, "runs/base/counts"); counts = sj.open_counts("runs/base/counts")
    analysis = sj.analyze_model(counts, sj.IdentifyConfig(eps=0.01), name="base")
    comparison = sj.compare_models(analysis_base, analysis_tuned)       # compare_series: a run
    sj.write_report("out/report", sj.build_summary([analysis_base, analysis_tuned], comparison=comparison))
    run = sj.open_run("runs/llama2")   # a finished `sparcom run --out runs/llama2`, back in Python

Models: load_model, save_model, init_model, abstract_model, ModelConfig, CausalLM,
load_tokenizer, default_tokenizer, make_mesh. Data: load_instructions, Record,
sample_balanced, encode_record, encode_records, content_caps, CATEGORIES, SHORT_NAMES,
normalize_category. Counts: collect_instructions, collect_counts, Counts, save_counts,
open_counts. Analysis: IdentifyConfig, analyze_model, compare_models, compare_series,
make_loss_fn, ablation_matrix, build_summary, write_report. Fine-tuning: TrainConfig,
finetune, export_series. CLI runs: open_run, Run.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# name -> module that defines it; imported on first use so `sparcom --help` stays fast.
_EXPORTS = {name: module for module, names in {
    "sparcom_jax.models.config": ["ModelConfig"],
    "sparcom_jax.models.transformer": ["CausalLM", "init_model", "abstract_model"],
    "sparcom_jax.checkpoints.hf": ["load_model", "save_model", "load_tokenizer"],
    "sparcom_jax.parallel.mesh": ["make_mesh"],
    "sparcom_jax.stats.counts": ["Counts"],
    "sparcom_jax.stats.collect": ["collect_counts", "collect_instructions"],
    "sparcom_jax.stats.store": ["open_counts", "save_counts"],
    "sparcom_jax.stats.losses": ["make_loss_fn"],
    "sparcom_jax.categories": ["CATEGORIES", "SHORT_NAMES", "normalize_category"],
    "sparcom_jax.data": ["Record", "load_instructions", "sample_balanced", "encode_record", "encode_records",
                         "content_caps", "default_tokenizer"],
    "sparcom_jax.analysis": ["IdentifyConfig", "analyze_model", "compare_models", "compare_series",
                             "ablation_matrix", "build_summary"],
    "sparcom_jax.report": ["write_report"],
    "sparcom_jax.train": ["TrainConfig", "finetune", "export_series"],
    "sparcom_jax.pipeline.reopen": ["open_run", "Run"],
}.items() for name in names}

__all__ = sorted(_EXPORTS)


def _lazy_exports(namespace: dict, exports: dict[str, str]):
    """The module `__getattr__` (PEP 562) of a package whose names `exports` maps to the modules
    defining them: each is imported on first use and kept in `namespace` (the package's globals)."""
    def __getattr__(name: str):
        if name in exports:
            value = getattr(importlib.import_module(exports[name]), name)
            namespace[name] = value
            return value
        raise AttributeError(f"module {namespace['__name__']!r} has no attribute {name!r}")
    return __getattr__


__getattr__ = _lazy_exports(globals(), _EXPORTS)


def __dir__():
    return sorted(list(globals()) + __all__)
