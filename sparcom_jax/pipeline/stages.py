"""The stages: finetune, collect, identify, evaluate, compare, ablate, report (and `run_all`).

Every stage takes a resolved `ExperimentConfig` and the output directory, calls
the library, writes its files under the directory and returns ``{label: path}``
of what it wrote (keys starting with "_" carry in-memory results to later stages).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from sparcom_jax.config import ConfigError, ExperimentConfig, MeshSpec, ModelSpec
from sparcom_jax.pipeline.common import (
    barrier, counts_root, identify_config, is_primary, load_records, load_spec_model, log, make_mesh, model_list,
    model_tokenizer, require_models, safe, save_resolved, template_for, timed,
)

# --------------------------------------------------------------------------- #
# finetune
# --------------------------------------------------------------------------- #


def train_config(cfg: ExperimentConfig, mesh_spec: MeshSpec | None = None):
    """The training TrainConfig of `cfg.train`, with the mesh axes of `cfg.mesh`."""
    mesh_spec = mesh_spec or cfg.mesh
    return dataclasses.replace(cfg.train, mesh_data=mesh_spec.data, mesh_model=mesh_spec.model)


def export_checkpoints(run_dir: Path, ck_dir: Path, names: Callable[[int, int], str | None],
                       tokenizer=None) -> list[tuple[str, str]]:
    """Export a training run's checkpoints as OUT/checkpoints/<name>/hf.

    Args:
      run_dir: the `finetune` run directory.
      ck_dir: OUT/checkpoints.
      names: (step, final_step) -> checkpoint name, or None to skip that step.

    Returns:
      [(name, hf dir)] in step order.
    """
    from sparcom_jax.train import checkpoint_steps, export_hf, read_run

    final = int(read_run(run_dir)["total_steps"])
    items = []
    log(f"exporting checkpoints of {run_dir} to {ck_dir}")
    for step in checkpoint_steps(run_dir):
        name = names(step, final)
        if name is None:
            continue
        dest = ck_dir / name / "hf"
        if is_primary():
            export_hf(run_dir, step, dest, tokenizer=tokenizer)
        items.append((name, str(dest)))
    barrier("sparcom:checkpoints-exported")  # every process reads these directories next
    return items


def finetune_stage(cfg: ExperimentConfig, out: Path, *, progress: bool = True) -> dict[str, Any]:
    """Instruction-fine-tune the base model; export every saved checkpoint as an HF directory.

    Writes OUT/train (orbax checkpoints, metrics.jsonl), OUT/checkpoints/<name>/hf
    (intermediate "<name>-step<k>" and the final "<name>") and OUT/checkpoints/series.json.
    """
    from sparcom_jax import train as T
    from sparcom_jax.data import sample_balanced

    require_models([cfg.base])
    mesh = make_mesh(cfg.mesh)
    tcfg = train_config(cfg)
    with timed(f"finetune: loading {cfg.base.label}"):
        model = load_spec_model(cfg.base, dtype="float32", mesh=mesh)
    tok = model_tokenizer(model)
    records = load_records(cfg, data=cfg.train_data) if cfg.train_data else load_records(cfg, n_per_category=None)
    eval_records = sample_balanced(records, 4, seed=cfg.seed) if len(records) >= 24 else None
    name = cfg.finetuned.label if cfg.finetuned else f"{cfg.base.label}-ft"
    steps = f"{tcfg.total_steps} steps" if tcfg.total_steps else f"{tcfg.epochs} epoch(s)"
    with timed(f"finetune: {cfg.base.label} -> {name}, {steps}"):
        T.finetune(model, records, tok, tcfg, out / "train", mesh=mesh, eval_records=eval_records,
                   progress=progress)
    items = export_checkpoints(out / "train", out / "checkpoints",
                               lambda s, f: None if s == 0 else (name if s == f else f"{name}-step{s}"), tok)
    if is_primary():
        from sparcom_jax.report.io import write_json

        write_json(out / "checkpoints" / "series.json", items)
    return {"checkpoints": str(out / "checkpoints"), **{n: p for n, p in items}}


# --------------------------------------------------------------------------- #
# collect and the analyses built on the counts
# --------------------------------------------------------------------------- #

def collect_stage(cfg: ExperimentConfig, out: Path, *, progress: bool = True,
                  models: Sequence[ModelSpec] | None = None) -> dict[str, Any]:
    """Count neuron activations and expert routing of every model on the instructions.

    Stores go to `collect.store` or OUT/counts/<model>; a finished store is kept
    (re-running resumes an interrupted one).
    """
    import jax

    from sparcom_jax.stats.collect import collect_instructions
    from sparcom_jax.stats.store import is_complete

    specs = list(models or model_list(cfg, out))
    require_models(specs)
    mesh = make_mesh(cfg.mesh)
    records = load_records(cfg)
    if jax.process_count() > 1:  # each process counts its share; stores are per process
        records = records[jax.process_index()::jax.process_count()]
    root = counts_root(cfg, out)
    written = {}
    for i, spec in enumerate(specs, 1):
        dest = root / safe(spec.label)
        written[spec.label] = str(dest)
        mine = dest / f"process_{jax.process_index()}" if jax.process_count() > 1 else dest
        if is_complete(mine):
            log(f"collect [{i}/{len(specs)}] {spec.label}: already complete in {dest}")
            continue
        with timed(f"collect [{i}/{len(specs)}] {spec.label}: {len(records)} instructions"):
            model = load_spec_model(spec, dtype=cfg.collect.dtype, mesh=mesh, moe_impl=cfg.collect.moe_impl)
            collect_instructions(model, records, model_tokenizer(model), template=template_for(spec, cfg),
                                 scope=cfg.data.scope, batch_size=cfg.collect.batch_size,
                                 max_length=cfg.data.max_length, out=dest, mesh=mesh, progress=progress,
                                 buckets=cfg.collect.buckets)
            del model
    return written


def open_model_counts(cfg: ExperimentConfig, out: Path, spec: ModelSpec):
    """The counts of one model (merging per-process stores of a multi-host run)."""
    import numpy as np

    from sparcom_jax.stats.counts import Counts
    from sparcom_jax.stats.store import open_counts

    root = counts_root(cfg, out) / safe(spec.label)
    parts = sorted(root.glob("process_*"), key=lambda p: int(p.name.split("_")[1]))
    if not parts:
        return open_counts(root)
    cs = [open_counts(p, in_memory=True) for p in parts]
    merged = {k: np.concatenate([getattr(c, k) for c in cs]) for k in ("tokens", *cs[0].arrays())}
    return Counts(ids=sum((c.ids or [] for c in cs), []), categories=sum((c.categories or [] for c in cs), []),
                  meta=dict(cs[0].meta, store=str(root)), **merged)


def _analysis_kwargs(cfg: ExperimentConfig, full: bool) -> dict[str, Any]:
    s = cfg.identify
    if not full:
        return dict(n_boot=0, n_perm=0, instruction_level=False, seed=cfg.seed)
    return dict(n_boot=s.n_boot, n_perm=s.n_perm, instruction_level=s.instruction_level, seed=cfg.seed)


def analyze_all(cfg: ExperimentConfig, out: Path, *, full: bool = True) -> dict[str, Any]:
    """{model label: ModelAnalysis} of every model with counts."""
    from sparcom_jax.analysis import analyze_model

    icfg = identify_config(cfg)
    res = {}
    specs = model_list(cfg, out)
    for i, spec in enumerate(specs, 1):
        with timed(f"analyse [{i}/{len(specs)}] {spec.label}"):
            counts = open_model_counts(cfg, out, spec)
            res[spec.label] = analyze_model(counts, icfg, name=spec.label, **_analysis_kwargs(cfg, full))
    return res


def identify_stage(cfg: ExperimentConfig, out: Path, *, analyses=None) -> dict[str, Any]:
    """Identify ISNs / ISEs of every model and export the lists (OUT/identify/<model>/)."""
    from sparcom_jax.report.export import export_sets

    analyses = analyses or analyze_all(cfg, out, full=False)
    written = {}
    for name, ma in analyses.items():
        d = out / "identify" / safe(name)
        for fa in ma.fields.values():
            export_sets(d, fa.ident)
        written[name] = str(d)
    return written


def evaluate_stage(cfg: ExperimentConfig, out: Path, *, analyses=None) -> dict[str, Any]:
    """Generality, uniqueness, overlaps and layer profiles of every model (OUT/evaluate/<model>.json)."""
    from sparcom_jax.report.io import write_json

    analyses = analyses or analyze_all(cfg, out, full=True)
    written = {}
    for name, ma in analyses.items():
        written[name] = write_json(out / "evaluate" / f"{safe(name)}.json", ma.summary())
    return written


def compare_stage(cfg: ExperimentConfig, out: Path, *, analyses=None) -> dict[str, Any]:
    """Before/after comparison, and the series along every checkpoint (OUT/compare/)."""
    from sparcom_jax.analysis import compare_models, compare_series
    from sparcom_jax.report.io import write_json

    analyses = analyses or analyze_all(cfg, out, full=True)
    names = list(analyses)
    if len(names) < 2:
        raise ConfigError("compare needs two models: set finetuned (and optionally series), "
                          "or run `sparcom finetune` first")
    comparison = compare_models(analyses[names[0]], analyses[names[-1]])
    written = {"comparison": write_json(out / "compare" / "comparison.json", comparison)}
    series = compare_series([(n, analyses[n]) for n in names]) if len(names) > 2 else None
    if series is not None:
        written["series"] = write_json(out / "compare" / "series.json", series)
    return {**written, "_comparison": comparison, "_series": series}


# --------------------------------------------------------------------------- #
# ablate
# --------------------------------------------------------------------------- #

def ablation_models(cfg: ExperimentConfig, out: Path) -> list[ModelSpec]:
    """The models the causal check runs on (`ablation.model`)."""
    specs = model_list(cfg, out)
    which = cfg.ablation.model
    if which == "base" or len(specs) == 1:
        return [specs[0]]
    if which == "finetuned":
        return [specs[-1]]
    return [specs[0], specs[-1]]


def _ablation_file(out: Path, label: str, kind: str) -> Path:
    return out / "ablate" / f"{safe(label)}_{kind}.json"


def ablate_stage(cfg: ExperimentConfig, out: Path, *, analyses=None) -> dict[str, Any]:
    """Causal check: switch off each category's ISNs (ISEs) and measure every category's loss.

    Writes OUT/ablate/<model>_<kind>.json; returns the AblationResults too.
    """
    from sparcom_jax.analysis import ablation_matrix
    from sparcom_jax.categories import CATEGORIES
    from sparcom_jax.report.io import write_json
    from sparcom_jax.stats.losses import make_loss_fn

    a = cfg.ablation
    if not a.enabled:
        log("ablate: disabled (ablation.enabled=false)")
        return {}
    require_models(ablation_models(cfg, out))
    analyses = analyses or analyze_all(cfg, out, full=False)
    records = load_records(cfg, n_per_category=a.max_records, seed=cfg.data.seed + 1) \
        if a.max_records else load_records(cfg)
    mesh = make_mesh(cfg.mesh)
    written: dict[str, Any] = {"_results": {}}
    for spec in ablation_models(cfg, out):
        ma = analyses[spec.label]
        model = load_spec_model(spec, dtype=cfg.collect.dtype, mesh=mesh, moe_impl=cfg.collect.moe_impl)
        tok = model_tokenizer(model)
        for kind, section in (("neurons", "isn"), ("experts", "ise")):
            if kind not in a.kinds or section not in ma.fields:
                continue
            sets = ma[section].ident.category_sets
            with timed(f"ablate {spec.label}: {kind} ({len(CATEGORIES)} categories x {1 + a.n_random} runs)"):
                # The collection's bucket lengths: the same padded shapes, fewer compilations.
                loss_fn = make_loss_fn(model, records, tok, kind=kind, template=template_for(spec, cfg),
                                       batch_size=a.batch_size, max_length=cfg.data.max_length, mesh=mesh,
                                       buckets=cfg.collect.buckets or None)
                total = 1 + int(sum(sets[i].any() for i in range(len(CATEGORIES)))) * (1 + a.n_random)
                try:
                    with _counting(loss_fn, total, f"ablate {kind}") as fn:
                        res = ablation_matrix({c: sets[i] for i, c in enumerate(CATEGORIES)}, fn,
                                              n_random=a.n_random, seed=cfg.seed, kind=kind)
                except ValueError as e:  # e.g. a category's ISEs cover every expert of a layer
                    if kind != "experts":
                        raise
                    log(f"ablate {spec.label}: experts skipped: {e}")
                    continue
            written[f"{spec.label}_{kind}"] = write_json(_ablation_file(out, spec.label, kind), res.to_dict())
            written["_results"][(spec.label, kind)] = res
        del model
    return written


class _counting:
    """Wrap a loss_fn with a progress bar over its calls (each is a pass over the records)."""

    def __init__(self, fn, total: int, desc: str):
        self.fn, self.total, self.desc = fn, total, desc

    def __enter__(self):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=self.total, desc=self.desc, unit="pass", file=sys.stderr)

        def call(mask):
            try:
                return self.fn(mask)
            finally:
                self.bar.update(1)

        return call

    def __exit__(self, *exc):
        self.bar.close()


def _ablation_from_json(cls, d: dict):
    import numpy as np

    from sparcom_jax.categories import CATEGORIES

    arr = lambda v: np.asarray([[np.nan if x is None else x for x in r] for r in v], float)  # noqa: E731
    draws = np.asarray([arr(m) for m in d["random_draws"]]) if d["random_draws"] else np.zeros((0, 6, 6))
    return cls(kind=d["kind"], baseline=d["baseline"], isn=arr(d["isn"]), random=arr(d["random"]),
               random_draws=draws, set_sizes=np.asarray([d["set_sizes"][c] for c in CATEGORIES]),
               n_random=d["n_random"], seed=d["seed"])


# --------------------------------------------------------------------------- #
# report
# --------------------------------------------------------------------------- #

def report_stage(cfg: ExperimentConfig, out: Path, *, analyses=None, comparison=None, series=None,
                 ablation: dict | None = None) -> dict[str, Any]:
    """Assemble summary.json and write the report directory (OUT/report/)."""
    from sparcom_jax.analysis import AblationResult, build_summary
    from sparcom_jax.report import write_report

    analyses = analyses or analyze_all(cfg, out, full=True)
    if comparison is None and len(analyses) >= 2:
        c = compare_stage(cfg, out, analyses=analyses)
        comparison, series = c["_comparison"], c["_series"]
    if ablation is None:  # from earlier `sparcom ablate` files
        ablation = {}
        for spec in ablation_models(cfg, out):
            for kind in ("neurons", "experts"):
                f = _ablation_file(out, spec.label, kind)
                if f.is_file():
                    ablation[(spec.label, kind)] = _ablation_from_json(AblationResult, json.loads(f.read_text()))
    # The summary holds one model's causal check: the fine-tuned model's when there are several.
    names = list(analyses)
    abl_model = next((n for n in reversed(names) if any(k[0] == n for k in ablation)), None)
    specs = model_list(cfg, out)
    summary = build_summary(
        analyses, config=identify_config(cfg), comparison=comparison, series=series,
        ablation=ablation.get((abl_model, "neurons")), ablation_experts=ablation.get((abl_model, "experts")),
        model_paths={s.label: s.path or "random init" for s in specs},
        data={"path": cfg.data.path or "shipped", "n_per_category": cfg.data.n_per_category,
              "template": cfg.data.template, "max_length": cfg.data.max_length},
        scope=cfg.data.scope,
        extra={"experiment": cfg.name, "ablation_model": abl_model},
    )
    rdir = out / "report"
    if is_primary():
        with timed(f"report: writing {rdir}"):
            write_report(rdir, summary, analyses=analyses, title=cfg.report.title or f"SPARCOM: {cfg.name}",
                         dpi=cfg.report.dpi)
    return {"report": str(rdir / "index.html"), "summary": str(rdir / "summary.json"), "_summary": summary}


# --------------------------------------------------------------------------- #
# All stages, one stage
# --------------------------------------------------------------------------- #

def run_all(cfg: ExperimentConfig, out: Path, *, progress: bool = True) -> dict[str, Any]:
    """Every stage in order: (finetune when no fine-tuned model is given), collect,
    identify, evaluate, compare, ablate, report."""
    written: dict[str, Any] = {}
    if cfg.finetuned is None and cfg.train.total_steps:
        written.update(finetune_stage(cfg, out, progress=progress))
    written.update(collect_stage(cfg, out, progress=progress))
    analyses = analyze_all(cfg, out, full=True)
    identify_stage(cfg, out, analyses=analyses)
    evaluate_stage(cfg, out, analyses=analyses)
    comparison = series = None
    if len(analyses) >= 2:
        c = compare_stage(cfg, out, analyses=analyses)
        comparison, series = c["_comparison"], c["_series"]
    abl = ablate_stage(cfg, out, analyses=analyses) if cfg.ablation.enabled else {}
    r = report_stage(cfg, out, analyses=analyses, comparison=comparison, series=series,
                     ablation=abl.get("_results", {}))
    return {"report": r["report"], "summary": r["summary"], "out": str(out)}


STAGE_FUNCS: dict[str, Callable[..., dict]] = {
    "finetune": finetune_stage, "collect": collect_stage, "identify": identify_stage,
    "evaluate": evaluate_stage, "compare": compare_stage, "ablate": ablate_stage,
    "report": report_stage, "run": run_all,
}


def run_stage(stage: str, cfg: ExperimentConfig, out: Path) -> dict[str, Any]:
    """Run one stage (or "run" for all), saving the resolved config first.

    Returns:
      {label: path} of the outputs (internal objects dropped).
    """
    out.mkdir(parents=True, exist_ok=True)
    save_resolved(cfg, out)
    res = STAGE_FUNCS[stage](cfg, out)
    return {"config": str(out / "config.yaml"),
            **{k: v for k, v in res.items() if not str(k).startswith("_")}}
