"""Thin orchestration of the SPARCOM stages; the `sparcom` command calls these.

Every stage takes a resolved `ExperimentConfig` and an output directory, calls
the library (models, data, stats, analysis, train, report), writes its files
under the directory and returns ``{label: path}`` of what it wrote. Layout:

    OUT/config.yaml                      the resolved config of the last command
    OUT/checkpoints/<name>/hf            fine-tuned and intermediate checkpoints
    OUT/checkpoints/series.json          [{"name", "step", "path"}] of the fine-tuning run
    OUT/train/                           the fine-tuning run (orbax), with fingerprint.json
    OUT/counts/<model>/                  per-instruction count stores (tensorstore)
    OUT/counts/<tuned>_under_<t>_template/  the same-template control of the tuned model
    OUT/identify/<model>/                ISN / ISE lists (CSV + JSON)
    OUT/evaluate/<model>.json            generality, uniqueness, overlaps, layers
    OUT/compare/comparison.json, series.json, same_template.json
    OUT/ablate/<model>_<kind>.json       causal check (with its fingerprint)
    OUT/report/index.html, summary.json  the report

Outputs are reused only when made with the same inputs and settings
(`sparcom_jax.pipeline.provenance`).

Modules:
    common     logging, output directory, mesh, models, record parts
    provenance fingerprints of each stage's inputs and the rule for reusing outputs
    stages     the stages, `run_all` and `run_stage`
    plan       the dry-run memory plan (`memory_plan`, `format_plan`)
    check      `selfcheck`: load a model, run a forward, compare with transformers
    demo       the embedded demo (`run_demo`) and its merged summary
    reopen     `open_run`: a finished run's config, summary, counts and checked analyses, from Python
"""

from sparcom_jax.console import fmt_bytes, fmt_count
from sparcom_jax.pipeline.common import (
    STAGES, ablate_records, identify_records, init_distributed, is_primary, load_spec_model,
    log, make_mesh, model_config, model_list, out_dir, record_parts, require_models, resolve_mesh, save_resolved,
    train_records,
)
from sparcom_jax.pipeline.demo import (
    FAST_OVERRIDES, demo_config, merge_pair_summaries, plain_text_records, run_demo, write_demo_report,
)
from sparcom_jax.pipeline.plan import format_plan, memory_plan, param_plan
from sparcom_jax.pipeline.check import TINY_ARCHS, selfcheck
from sparcom_jax.pipeline.stages import (
    STAGE_FUNCS, ablate_stage, ablation_models, analyze_all, collect_stage, compare_stage, count_jobs,
    evaluate_stage, export_checkpoints, finetune_stage, identify_stage, open_model_counts, report_stage, run_all,
    run_stage, train_config,
)

__all__ = [
    "FAST_OVERRIDES", "STAGES", "STAGE_FUNCS", "TINY_ARCHS", "ablate_records", "ablate_stage", "ablation_models",
    "analyze_all", "collect_stage", "compare_stage", "count_jobs", "demo_config", "evaluate_stage",
    "export_checkpoints", "finetune_stage", "fmt_bytes", "fmt_count", "format_plan", "identify_records",
    "identify_stage", "init_distributed", "is_primary", "load_spec_model", "log", "make_mesh", "memory_plan",
    "merge_pair_summaries", "model_config", "model_list", "open_model_counts", "out_dir", "param_plan",
    "plain_text_records", "record_parts", "report_stage", "require_models", "resolve_mesh", "run_all",
    "run_demo", "run_stage", "save_resolved", "selfcheck", "train_config", "train_records", "write_demo_report",
]
