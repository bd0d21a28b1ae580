"""Thin orchestration of the SPARCOM stages; the `sparcom` command calls these.

Every stage takes a resolved `ExperimentConfig` and an output directory, calls
the library (models, data, stats, analysis, train, report), writes its files
under the directory and returns ``{label: path}`` of what it wrote. Layout:

    OUT/config.yaml                      the resolved config of the last command
    OUT/checkpoints/<name>/hf            fine-tuned and intermediate checkpoints
    OUT/checkpoints/series.json          [(name, hf dir)] of the fine-tuning run
    OUT/counts/<model>/                  per-instruction count stores (tensorstore)
    OUT/identify/<model>/                ISN / ISE lists (CSV + JSON)
    OUT/evaluate/<model>.json            generality, uniqueness, overlaps, layers
    OUT/compare/comparison.json, series.json
    OUT/ablate/<model>_<kind>.json       causal check
    OUT/report/index.html, summary.json  the report

Sections: helpers, stages (`run_stage`), the dry-run plan (`memory_plan`,
`format_plan`), `selfcheck`, and the demo (`run_demo`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from sparcom_jax.config import (
    ConfigError, DemoConfig, ExperimentConfig, MeshSpec, ModelSpec, dump_config,
)

STAGES = ("finetune", "collect", "identify", "evaluate", "compare", "ablate", "report")


# --------------------------------------------------------------------------- #
# Small helpers
# --------------------------------------------------------------------------- #

_T0 = time.perf_counter()


def log(msg: str) -> None:
    """A progress line on stderr (stdout stays for results), stamped with the elapsed time."""
    el = time.perf_counter() - _T0
    print(f"[sparcom {int(el // 60):d}:{el % 60:04.1f}] {msg}", file=sys.stderr, flush=True)


def is_primary() -> bool:
    """Whether this process writes shared outputs (process 0 of a multi-host run)."""
    if "jax" not in sys.modules:
        return True
    import jax

    return jax.process_index() == 0


def out_dir(cfg: ExperimentConfig | DemoConfig, out: str | os.PathLike | None) -> Path:
    """The output directory: --out, else the config's out_dir, else runs/<name>."""
    if out is not None:
        return Path(out)
    if cfg.out_dir:
        return Path(cfg.out_dir)
    return Path("runs") / getattr(cfg, "name", "demo")


def save_resolved(cfg: Any, out: Path) -> Path:
    """Write the resolved config next to the outputs (OUT/config.yaml)."""
    if not is_primary():
        return out / "config.yaml"
    return dump_config(cfg, out / "config.yaml")


def init_distributed(mesh: MeshSpec) -> bool:
    """Call `jax.distributed.initialize` for a multi-process run (before any other JAX call).

    On TPU VMs every argument is detected; elsewhere `mesh.coordinator`,
    `mesh.num_processes` and the SPARCOM_PROCESS_ID (or JAX_PROCESS_ID)
    environment variable give them.

    Returns:
      True when it initialised.
    """
    if not (mesh.distributed or mesh.num_processes > 1):
        return False
    import jax

    kwargs: dict[str, Any] = {}
    if mesh.coordinator:
        kwargs["coordinator_address"] = mesh.coordinator
        kwargs["num_processes"] = mesh.num_processes
        pid = os.environ.get("SPARCOM_PROCESS_ID", os.environ.get("JAX_PROCESS_ID"))
        if pid is None:
            raise ConfigError("mesh.coordinator is set but this process has no id; set SPARCOM_PROCESS_ID")
        kwargs["process_id"] = int(pid)
    jax.distributed.initialize(**kwargs)
    log(f"jax.distributed: process {jax.process_index()} of {jax.process_count()}, "
        f"{jax.device_count()} devices")
    return True


def resolve_mesh(mesh: MeshSpec, devices: int | None = None) -> tuple[int, int, int]:
    """(devices, data, model) of the mesh, by arithmetic only (no devices needed).

    Args:
      mesh: the config's mesh settings.
      devices: device count to plan for; default mesh.devices, else data * model
        when data is set, else the devices JAX sees.

    Raises:
      ConfigError: when the axes do not factor the device count.
    """
    n = devices or mesh.devices or (mesh.data * mesh.model if mesh.data else None)
    if n is None:
        import jax

        n = jax.device_count()
    divisors = [d for d in range(1, n + 1) if n % d == 0]
    if n % mesh.model:
        raise ConfigError(f"mesh.model={mesh.model} does not divide the {n} devices; "
                          f"choose one of {divisors}")
    data = mesh.data if mesh.data is not None else n // mesh.model
    if data * mesh.model != n:
        raise ConfigError(f"mesh.data={data} x mesh.model={mesh.model} = {data * mesh.model}, "
                          f"but there are {n} devices; set mesh.data={n // mesh.model} or leave it null")
    if n % mesh.num_processes:
        raise ConfigError(f"mesh.num_processes={mesh.num_processes} does not divide the {n} devices")
    return n, data, mesh.model


def make_mesh(mesh: MeshSpec):
    """A real ("data", "model") Mesh over the visible devices, or None for one device."""
    import jax

    from sparcom_jax.parallel.mesh import make_mesh as _make

    n, data, model = resolve_mesh(dataclasses.replace(mesh, devices=None), jax.device_count())
    if n == 1:
        return None
    return _make(data=data, model=model)


def model_config(spec: ModelSpec, cfg: ExperimentConfig | None = None):
    """The ModelConfig of a model: its config.json, else its `init` dict, else `architecture`.

    Raises:
      ConfigError: when none of them is available.
    """
    from sparcom_jax.models.config import ModelConfig

    if spec.path and (Path(spec.path) / "config.json").is_file():
        return ModelConfig.from_pretrained(spec.path), f"{spec.path}/config.json"
    if spec.init is not None:
        arch = dict(spec.init)
        if arch.get("vocab_size") is None:
            from sparcom_jax.data import default_tokenizer

            arch["vocab_size"] = len(default_tokenizer())
        return ModelConfig.from_hf_config(arch, source=f"{spec.label}.init"), f"{spec.label}.init (random)"
    if cfg is not None and cfg.architecture is not None:
        return ModelConfig.from_hf_config(cfg.architecture, source="architecture"), "architecture (config)"
    where = f"no config.json in {spec.path}" if spec.path else "no path"
    raise ConfigError(f"model {spec.label!r}: {where} and no `architecture:` block in the config; "
                      "download the weights or add the published config.json fields under architecture:")


def require_models(specs: Sequence[ModelSpec]) -> None:
    """Fail before any work when a model directory is missing (or a spec has neither path nor init)."""
    for spec in specs:
        if spec.path and not (Path(spec.path) / "config.json").is_file():
            raise ConfigError(
                f"model {spec.label!r}: {spec.path} " + ("has no config.json" if Path(spec.path).is_dir()
                                                          else "does not exist") + "; download it first"
                + (f" (huggingface-cli download {spec.hub_id} --local-dir {spec.path})" if spec.hub_id else ""))
        if not spec.path and spec.init is None:
            raise ConfigError(f"model {spec.label!r}: set path (a Hugging Face directory) or init")


def load_spec_model(spec: ModelSpec, dtype: str = "float32", mesh=None):
    """Load a model from its HF directory, or build it from `init` (random weights)."""
    from sparcom_jax.checkpoints.hf import load_model

    require_models([spec])
    if spec.path:
        return load_model(spec.path, dtype=dtype, mesh=mesh)
    from sparcom_jax.data import default_tokenizer
    from sparcom_jax.models.config import ModelConfig
    from sparcom_jax.models.transformer import init_model

    arch = dict(spec.init)
    tok = default_tokenizer()
    if arch.get("vocab_size") is None:
        arch["vocab_size"] = len(tok)
    model = init_model(ModelConfig.from_hf_config(arch, source=f"{spec.label}.init"), seed=spec.seed, dtype=dtype)
    model.tokenizer = tok
    model.source_path = None
    return model


def model_tokenizer(model):
    """The model directory's tokenizer, else the shipped one."""
    tok = getattr(model, "tokenizer", None)
    if tok is not None:
        return tok
    from sparcom_jax.data import default_tokenizer

    return default_tokenizer()


def load_records(cfg: ExperimentConfig, n_per_category: int | None = -1, seed: int | None = None, *,
                 data=None):
    """The instruction records of `data` (default cfg.data; n_per_category=-1: its own value)."""
    from sparcom_jax.data import load_instructions

    d = data or cfg.data
    return load_instructions(
        d.path, fields=d.fields, adapter=d.adapter, lenient=d.lenient,
        n_per_category=d.n_per_category if n_per_category == -1 else n_per_category,
        seed=d.seed if seed is None else seed)


def identify_config(cfg: ExperimentConfig):
    """The analysis IdentifyConfig of `cfg.identify`."""
    from sparcom_jax.analysis import IdentifyConfig

    return IdentifyConfig(**cfg.identify.rule_kwargs())


def model_list(cfg: ExperimentConfig, out: Path) -> list[ModelSpec]:
    """Base, series and fine-tuned models; a `finetune` run's checkpoints fill in when
    the config names no fine-tuned model."""
    if cfg.finetuned is not None:
        return cfg.models()
    manifest = out / "checkpoints" / "series.json"
    if manifest.is_file():
        items = json.loads(manifest.read_text())
        return [cfg.base] + [ModelSpec(name=n, path=p, template=cfg.train.template) for n, p in items]
    return [cfg.base]


def _label(spec: ModelSpec) -> str:
    from sparcom_jax.report.tables import safe_name

    return safe_name(spec.label)


def _template(spec: ModelSpec, cfg: ExperimentConfig) -> str:
    return spec.template or cfg.data.template


def _timed(what: str):
    class _T:
        def __enter__(self):
            self.t = time.perf_counter()
            log(f"{what} ...")

        def __exit__(self, *exc):
            if exc[0] is None:
                log(f"{what}: done in {time.perf_counter() - self.t:.1f} s")

    return _T()


# --------------------------------------------------------------------------- #
# Stages
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
    with _timed(f"finetune: loading {cfg.base.label}"):
        model = load_spec_model(cfg.base, dtype="float32", mesh=mesh)
    tok = model_tokenizer(model)
    records = load_records(cfg, data=cfg.train_data) if cfg.train_data else load_records(cfg, n_per_category=None)
    eval_records = sample_balanced(records, 4, seed=cfg.seed) if len(records) >= 24 else None
    name = cfg.finetuned.label if cfg.finetuned else f"{cfg.base.label}-ft"
    steps = f"{tcfg.total_steps} steps" if tcfg.total_steps else f"{tcfg.epochs} epoch(s)"
    with _timed(f"finetune: {cfg.base.label} -> {name}, {steps}"):
        T.finetune(model, records, tok, tcfg, out / "train", mesh=mesh, eval_records=eval_records,
                   progress=progress)
    items = export_checkpoints(out / "train", out / "checkpoints",
                               lambda s, f: None if s == 0 else (name if s == f else f"{name}-step{s}"), tok)
    if is_primary():
        from sparcom_jax.report.io import write_json

        write_json(out / "checkpoints" / "series.json", items)
    return {"checkpoints": str(out / "checkpoints"), **{n: p for n, p in items}}


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
    store_root = Path(cfg.collect.store) if cfg.collect.store else out / "counts"
    written = {}
    for i, spec in enumerate(specs, 1):
        dest = store_root / _label(spec)
        written[spec.label] = str(dest)
        mine = dest / f"process_{jax.process_index()}" if jax.process_count() > 1 else dest
        if is_complete(mine):
            log(f"collect [{i}/{len(specs)}] {spec.label}: already complete in {dest}")
            continue
        with _timed(f"collect [{i}/{len(specs)}] {spec.label}: {len(records)} instructions"):
            model = load_spec_model(spec, dtype=cfg.collect.dtype, mesh=mesh)
            collect_instructions(model, records, model_tokenizer(model), template=_template(spec, cfg),
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

    root = (Path(cfg.collect.store) if cfg.collect.store else out / "counts") / _label(spec)
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
        with _timed(f"analyse [{i}/{len(specs)}] {spec.label}"):
            counts = open_model_counts(cfg, out, spec)
            res[spec.label] = analyze_model(counts, icfg, name=spec.label, **_analysis_kwargs(cfg, full))
    return res


def identify_stage(cfg: ExperimentConfig, out: Path, *, analyses=None) -> dict[str, Any]:
    """Identify ISNs / ISEs of every model and export the lists (OUT/identify/<model>/)."""
    from sparcom_jax.report.export import export_sets

    analyses = analyses or analyze_all(cfg, out, full=False)
    written = {}
    for name, ma in analyses.items():
        d = out / "identify" / _safe(name)
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
        written[name] = write_json(out / "evaluate" / f"{_safe(name)}.json", ma.summary())
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


def ablation_models(cfg: ExperimentConfig, out: Path) -> list[ModelSpec]:
    specs = model_list(cfg, out)
    which = cfg.ablation.model
    if which == "base" or len(specs) == 1:
        return [specs[0]]
    if which == "finetuned":
        return [specs[-1]]
    return [specs[0], specs[-1]]


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
        model = load_spec_model(spec, dtype=cfg.collect.dtype, mesh=mesh)
        tok = model_tokenizer(model)
        for kind, section in (("neurons", "isn"), ("experts", "ise")):
            if kind not in a.kinds or section not in ma.fields:
                continue
            sets = ma[section].ident.category_sets
            with _timed(f"ablate {spec.label}: {kind} ({len(CATEGORIES)} categories x {1 + a.n_random} runs)"):
                loss_fn = _loss_fn(make_loss_fn, model, records, tok, kind=kind, template=_template(spec, cfg),
                                   batch_size=a.batch_size, max_length=cfg.data.max_length, mesh=mesh,
                                   buckets=cfg.collect.buckets)
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
            written[f"{spec.label}_{kind}"] = write_json(
                out / "ablate" / f"{_safe(spec.label)}_{kind}.json", res.to_dict())
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


def _loss_fn(make_loss_fn, *args, buckets=None, **kwargs):
    """make_loss_fn with fixed bucket lengths (fewer compilations) when given."""
    import inspect

    if buckets and "buckets" in inspect.signature(make_loss_fn).parameters:
        return make_loss_fn(*args, buckets=buckets, **kwargs)
    fn = make_loss_fn(*args, **kwargs)
    runner = getattr(fn, "runner", None)
    if buckets and runner is not None and hasattr(runner, "buckets"):
        runner.buckets = tuple(buckets)  # TODO: drop once make_loss_fn takes buckets=
    return fn


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
                f = out / "ablate" / f"{_safe(spec.label)}_{kind}.json"
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
        with _timed(f"report: writing {rdir}"):
            write_report(rdir, summary, analyses=analyses, title=cfg.report.title or f"SPARCOM: {cfg.name}",
                         dpi=cfg.report.dpi)
    return {"report": str(rdir / "index.html"), "summary": str(rdir / "summary.json"), "_summary": summary}


def _ablation_from_json(cls, d: dict):
    import numpy as np

    arr = lambda v: np.asarray([[np.nan if x is None else x for x in r] for r in v], float)  # noqa: E731
    draws = np.asarray([arr(m) for m in d["random_draws"]]) if d["random_draws"] else np.zeros((0, 6, 6))
    from sparcom_jax.categories import CATEGORIES

    return cls(kind=d["kind"], baseline=d["baseline"], isn=arr(d["isn"]), random=arr(d["random"]),
               random_draws=draws, set_sizes=np.asarray([d["set_sizes"][c] for c in CATEGORIES]),
               n_random=d["n_random"], seed=d["seed"])


def _safe(name: str) -> str:
    from sparcom_jax.report.tables import safe_name

    return safe_name(name)


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


# --------------------------------------------------------------------------- #
# Dry run: mesh resolution and memory plan (no weights read)
# --------------------------------------------------------------------------- #

_ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2, "int32": 4}


def fmt_bytes(n: float) -> str:
    """Human-readable bytes (binary units)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


def fmt_count(n: float) -> str:
    """Parameter counts as 6.74B / 124.4M / 12.3K."""
    for div, s in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.2f}{s}"
    return str(int(n))


def _abstract_mesh(data: int, model: int):
    """Something with `.shape` for the sharding rules; no devices needed."""
    try:
        from jax.sharding import AbstractMesh

        return AbstractMesh((data, model), ("data", "model"))
    except Exception:  # older / newer signatures: plain arithmetic is all the rules need
        import types

        return types.SimpleNamespace(shape={"data": data, "model": model})


def param_plan(mcfg, dtype: str, data: int, model: int, rules: str = "analysis") -> dict[str, Any]:
    """Parameter count, total bytes and bytes per device under the sharding rules.

    Uses `abstract_model` (jax.eval_shape): shapes only, no memory.
    """
    from flax import nnx

    from sparcom_jax.models.transformer import abstract_model
    from sparcom_jax.parallel.sharding import ANALYSIS_RULES, FSDP_RULES, logical_axes, spec_for

    table = FSDP_RULES if rules == "fsdp" else ANALYSIS_RULES
    mesh = _abstract_mesh(data, model)
    shape = dict(mesh.shape)
    m = abstract_model(mcfg, dtype=dtype)
    n = per_dev = 0
    sharded: set[str] = set()
    replicated: set[str] = set()
    for key, var in nnx.to_flat_state(nnx.state(m, nnx.Param)):
        size = math.prod(var.shape)
        n += size
        axes = logical_axes(key, len(var.shape))
        spec = spec_for(axes, var.shape, mesh, table)
        split = 1
        for name, ax in zip(axes, spec, strict=True):
            if ax is not None:
                split *= shape[ax]
                if shape[ax] > 1:
                    sharded.add(f"{name}->{ax}")
            elif name and table.get(name) and shape.get(table[name], 1) > 1:
                replicated.add(name)
        per_dev += size / split
    item = _ITEMSIZE[dtype]
    return {"params": n, "dtype": dtype, "bytes": n * item, "bytes_per_device": per_dev * item,
            "params_per_device": per_dev, "sharded": sorted(sharded),
            "not_divisible": sorted(replicated - {s.split("->")[0] for s in sharded})}


def _n_instructions(cfg: ExperimentConfig) -> int | None:
    from sparcom_jax.categories import CATEGORIES

    if cfg.data.n_per_category is not None:
        return cfg.data.n_per_category * len(CATEGORIES)
    paths = cfg.data.path if isinstance(cfg.data.path, list) else [cfg.data.path]
    if all(p is None or Path(p).exists() for p in paths):
        try:
            return len(load_records(cfg))
        except Exception:  # the plan still works without N
            return None
    return None


def memory_plan(cfg: ExperimentConfig, stage: str = "run", devices: int | None = None) -> dict[str, Any]:
    """Everything a dry run prints, as a dict (see `format_plan`).

    Args:
      cfg: the resolved config.
      stage: a stage name or "run".
      devices: device count to plan for (default mesh.devices, else the visible devices).
    """
    n_dev, data, model = resolve_mesh(cfg.mesh, devices)
    specs = cfg.models()
    mcfg, source = model_config(specs[0], cfg)
    others = []
    for s in specs[1:]:
        try:
            c, _ = model_config(s, cfg)
            if c != mcfg:
                others.append(s.label)
        except ConfigError:
            pass
    weights = {s.label: bool(s.path and (Path(s.path) / "config.json").is_file()) for s in specs}
    L = mcfg.num_layers
    plan: dict[str, Any] = {
        "stage": stage, "experiment": cfg.name, "model_type": mcfg.model_type, "architecture_source": source,
        "models": [s.label for s in specs], "weights_present": weights, "architecture_differs": others,
        "mesh": {"devices": n_dev, "data": data, "model": model, "num_processes": cfg.mesh.num_processes,
                 "distributed": cfg.mesh.distributed or cfg.mesh.num_processes > 1},
        "param_count": mcfg.param_count(),
    }
    stages = STAGES if stage == "run" else (stage,)
    rows = []
    analysis = {"collect", "ablate"} & set(stages)
    if analysis:
        p = param_plan(mcfg, cfg.collect.dtype, data, model, "analysis")
        plan["params"] = p
        rows.append(("parameters (analysis, " + p["dtype"] + ")", f"{fmt_count(p['params'])}",
                     p["bytes"], p["bytes_per_device"]))
        p32 = param_plan(mcfg, "float32", data, model, "analysis")
        rows.append(("parameters (float32)", "", p32["bytes"], p32["bytes_per_device"]))
    if "finetune" in stages and (stage == "finetune" or cfg.finetuned is None):
        t = cfg.train
        t.check_mesh(data)  # the batch must split over the data axis
        t.check_model(mcfg.max_position_embeddings)
        p = param_plan(mcfg, "float32", data, model, "fsdp")
        opt = {"adamw": 2, "lion": 1, "sgd": 1}.get(t.optimizer, 2)
        state = p["bytes"] * (2 + opt)  # master weights + grads + optimizer moments, float32
        rows.append((f"training state (f32 params+grads+{opt} {t.optimizer} moments, FSDP)",
                     fmt_count(p["params"]), state, p["bytes_per_device"] * (2 + opt)))
        plan["train_params"] = p
        B = max(1, t.micro_batch_size // data)
        logits = B * t.max_length * mcfg.vocab_size * 4
        rows.append((f"logits+grad [B={B},T={t.max_length},V] f32 per device", "", logits * 2 * data, logits * 2))
        act = B * t.max_length * mcfg.hidden_size * _ITEMSIZE[t.compute_dtype] * L * 4
        rows.append(("saved activations ~4x[B,T,D] x L per device", "", act * data, act))
    if "collect" in stages:
        B = max(1, math.ceil(cfg.collect.batch_size / data))
        T = cfg.data.max_length
        it = _ITEMSIZE[cfg.collect.dtype]
        D, H = mcfg.hidden_size, mcfg.num_heads
        attn = B * max(1, H // model) * T * T * 4 * 2
        if mcfg.is_moe:
            ffn = B * T * mcfg.top_k * mcfg.moe_intermediate_size * 4 * 3 + B * T * mcfg.num_experts * 4
            ffn += B * T * mcfg.shared_expert_intermediate_size // model * it * 3
        else:
            ffn = B * T * mcfg.intermediate_size // model * it * 3
        rows.append((f"forward activations (one layer, B={B}/device, T={T})", "",
                     (B * T * D * it * 6 + attn + ffn) * data, B * T * D * it * 6 + attn + ffn))
        cnt = _count_shapes(mcfg)
        for name, shp in cnt.items():
            per = math.prod(shp) * 4
            rows.append((f"counts {name} [B,{','.join(_axis_names(name))}] int32", f"B={B}", per * B * data, per * B))
    store = None
    if {"collect", "identify", "evaluate", "compare", "report"} & set(stages):
        N = _n_instructions(cfg)
        cnt = _count_shapes(mcfg)
        per_instr = sum(math.prod(s) for s in cnt.values()) * 4 + 4
        store = {"n_instructions": N, "bytes_per_instruction": per_instr,
                 "fields": {k: list(v) for k, v in cnt.items()},
                 "bytes_per_model": None if N is None else per_instr * N,
                 "models": len(specs)}
        plan["count_store"] = store
    if {"identify", "evaluate", "compare", "report"} & set(stages):
        N = store["n_instructions"] if store else None
        cnt = _count_shapes(mcfg)
        U = max(math.prod(s) for s in cnt.values())
        chunk = cfg.identify.chunk
        host = chunk * U * 4
        sets = None if N is None else N * U  # bool S(I) while the instruction-level overlap is computed
        jac = None if N is None else N * N * 4
        plan["analysis_host"] = {"chunk_frequencies": host, "instruction_sets": sets, "instruction_matrix": jac}
    plan["rows"] = rows
    return plan


def _count_shapes(mcfg) -> dict[str, tuple[int, ...]]:
    L = mcfg.num_layers
    out = {}
    if mcfg.neuron_width:
        out["neuron_active"] = (L, mcfg.neuron_width)
    if mcfg.is_moe:
        out["expert_routed"] = (L, mcfg.num_experts)
        out["expert_neuron_active"] = (L, mcfg.num_experts, mcfg.moe_intermediate_size)
    return out


def _axis_names(field: str) -> tuple[str, ...]:
    return {"neuron_active": ("L", "F"), "expert_routed": ("L", "E"),
            "expert_neuron_active": ("L", "E", "G")}[field]


def format_plan(plan: dict[str, Any]) -> str:
    """The dry-run report as a readable table."""
    m = plan["mesh"]
    lines = [
        f"dry run: sparcom {plan['stage']} ({plan['experiment']}) — config valid, no weights read",
        "",
        f"  model type        {plan['model_type']} (from {plan['architecture_source']})",
        f"  parameters        {plan['param_count']:,} ({fmt_count(plan['param_count'])})",
        "  models            " + ", ".join(
            f"{n} ({'weights found' if ok else 'weights not present'})" for n, ok in plan["weights_present"].items()),
        f"  mesh              {m['devices']} devices = data {m['data']} x model {m['model']}"
        + (f", {m['num_processes']} processes" if m["num_processes"] > 1 else "")
        + (" (jax.distributed.initialize)" if m["distributed"] else ""),
    ]
    if plan["architecture_differs"]:
        lines.append(f"  note              architecture differs for {', '.join(plan['architecture_differs'])}")
    p = plan.get("params") or plan.get("train_params")
    if p:
        lines.append("  sharded axes      " + (", ".join(p["sharded"]) or "none (replicated)"))
        if p["not_divisible"]:
            lines.append("  replicated        " + ", ".join(p["not_divisible"]) + " (size not divisible by the axis)")
    if plan["rows"]:
        w = max(len(r[0]) for r in plan["rows"]) + 2
        lines += ["", f"  {'memory':<{w}}{'count':>10}{'total':>14}{'per device':>14}"]
        for name, count, total, per in plan["rows"]:
            lines.append(f"  {name:<{w}}{count:>10}{fmt_bytes(total):>14}{fmt_bytes(per):>14}")
    s = plan.get("count_store")
    if s:
        n = s["n_instructions"]
        lines += ["", "  count store (per model, int32; N instructions)"]
        for k, shp in s["fields"].items():
            lines.append(f"    {k:<22} N x {' x '.join(map(str, shp))}"
                         f"  = {fmt_bytes(math.prod(shp) * 4)} per instruction")
        tot = "N unknown" if n is None else f"N={n}: {fmt_bytes(s['bytes_per_model'])} per model, " \
                                            f"{fmt_bytes(s['bytes_per_model'] * s['models'])} for {s['models']} models"
        lines.append(f"    total                  {tot}")
    a = plan.get("analysis_host")
    if a:
        lines += ["", "  analysis (host memory)",
                  f"    frequency chunk        {fmt_bytes(a['chunk_frequencies'])}"]
        if a["instruction_sets"] is not None:
            lines.append(f"    instruction sets S(I)  {fmt_bytes(a['instruction_sets'])} (bool; /8 when packed)")
            lines.append(f"    instruction matrix     {fmt_bytes(a['instruction_matrix'])} (N x N float32)")
    return "\n".join(lines)


# --------------------------------------------------------------------------- #
# Self-check
# --------------------------------------------------------------------------- #

TINY_ARCHS: dict[str, dict[str, Any]] = {
    "llama": dict(model_type="llama", vocab_size=256, hidden_size=64, intermediate_size=128,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=128, rms_norm_eps=1e-5, tie_word_embeddings=False),
    "mixtral": dict(model_type="mixtral", vocab_size=256, hidden_size=64, intermediate_size=96,
                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                    num_experts_per_tok=2, max_position_embeddings=128, rms_norm_eps=1e-5,
                    tie_word_embeddings=False),
}


def selfcheck(path: str | None = None, *, model_type: str = "llama", dtype: str = "float32",
              compare: bool = True, seq_len: int = 16, atol: float = 1e-3) -> dict[str, Any]:
    """Load an HF directory (or build a tiny random model), run a forward, check it.

    Checks logits shape [B, T, V] and finiteness and, when torch and
    transformers are importable, compares the logits with transformers'.

    Returns:
      {"ok", "model", "shape", "finite", "max_abs_diff" (or None), "reference"}.
    """
    import tempfile

    import numpy as np

    from sparcom_jax.checkpoints.hf import load_model, save_model
    from sparcom_jax.models.config import ModelConfig
    from sparcom_jax.models.transformer import init_model

    tmp = None
    if path is None:
        if model_type not in TINY_ARCHS:
            raise ConfigError(f"selfcheck: unknown --model-type {model_type!r}; choose {', '.join(TINY_ARCHS)}")
        model = init_model(ModelConfig.from_hf_config(TINY_ARCHS[model_type]), seed=0, dtype=dtype)
        if compare:
            tmp = tempfile.TemporaryDirectory(prefix="sparcom-selfcheck-")
            path = save_model(model, Path(tmp.name) / "model")
        label = f"tiny random {model_type}"
    else:
        model = load_model(path, dtype=dtype)
        label = str(path)
    cfg = model.config
    rng = np.random.default_rng(0)
    ids = rng.integers(0, cfg.vocab_size, size=(2, seq_len), dtype=np.int32)
    mask = np.ones_like(ids)
    mask[1, seq_len // 2:] = 0  # right padding on the second row
    with _timed(f"selfcheck: forward of {label}"):
        logits = np.asarray(model(ids, mask))
    res: dict[str, Any] = {"model": label, "params": cfg.param_count(), "shape": list(logits.shape),
                           "finite": bool(np.isfinite(logits).all()), "max_abs_diff": None, "reference": None}
    res["shape_ok"] = res["shape"] == [2, seq_len, cfg.vocab_size]
    if compare and path is not None:
        try:
            import torch
            from transformers import AutoModelForCausalLM
        except ImportError:
            res["reference"] = "skipped (torch/transformers not installed)"
        else:
            with _timed("selfcheck: transformers reference"):
                ref = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
                with torch.no_grad():
                    out = ref(input_ids=torch.from_numpy(ids.astype(np.int64)),
                              attention_mask=torch.from_numpy(mask.astype(np.int64))).logits.numpy()
            valid = mask.astype(bool)
            res["max_abs_diff"] = float(np.abs(out[valid] - logits[valid]).max())
            res["reference"] = "transformers"
    if tmp is not None:
        tmp.cleanup()
    tol = atol if dtype == "float32" else 0.1 * max(1.0, float(np.abs(logits).max()))
    res["ok"] = res["finite"] and res["shape_ok"] and (res["max_abs_diff"] is None or res["max_abs_diff"] <= tol)
    return res


# --------------------------------------------------------------------------- #
# The embedded demo
# --------------------------------------------------------------------------- #

# One padded length everywhere (one compilation per step function), a few steps, few records.
FAST_OVERRIDES = (
    "pretrain.total_steps=6", "pretrain.batch_size=8", "pretrain.warmup_steps=1", "pretrain.max_length=64",
    "pretrain.buckets=[64]", "pretrain.save_every=6",
    "finetune.total_steps=4", "finetune.batch_size=8", "finetune.warmup_steps=1", "finetune.save_every=2",
    "finetune.max_length=64", "finetune.buckets=[64]", "data.n_per_category=4", "data.max_length=64",
    "collect.buckets=[64]", "identify.n_boot=5", "identify.n_perm=19", "ablation.n_random=1",
    "ablation.max_records=2", "ablation.batch_size=12", "collect.batch_size=8", "report.dpi=60",
)


@contextlib.contextmanager
def compilation_cache(path: str | os.PathLike):
    """Share compiled step functions between runs with the same shapes (JAX's persistent
    cache) inside the block, unless the user configured a cache already; restored after."""
    import jax

    if jax.config.jax_compilation_cache_dir:
        yield
        return
    old_min = jax.config.jax_persistent_cache_min_compile_time_secs
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    try:
        yield
    finally:
        jax.config.update("jax_compilation_cache_dir", None)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", old_min)
        try:
            from jax.experimental.compilation_cache import compilation_cache as cc

            cc.reset_cache()
        except (ImportError, AttributeError):
            pass


def demo_config(fast: bool = False, overrides: Sequence[str] = ()) -> DemoConfig:
    """The demo's defaults, shrunk by FAST_OVERRIDES when `fast`."""
    from sparcom_jax.config import apply_overrides

    cfg = DemoConfig()
    if fast:
        cfg = apply_overrides(cfg, ["fast=true", *FAST_OVERRIDES])
    return apply_overrides(cfg, list(overrides))


def _pair_experiment(demo: DemoConfig, pair_name: str, ckpts: list[tuple[str, str]]) -> ExperimentConfig:
    base, *mid, last = ckpts
    return ExperimentConfig(
        name=f"demo-{pair_name}",
        base=ModelSpec(name=base[0], path=base[1], template=demo.data.template),
        series=[ModelSpec(name=n, path=p, template=demo.finetune.template) for n, p in mid],
        finetuned=ModelSpec(name=last[0], path=last[1], template=demo.finetune.template),
        data=demo.data, identify=demo.identify, collect=demo.collect, ablation=demo.ablation,
        report=dataclasses.replace(demo.report, title=f"{demo.report.title or 'sparcom demo'}: {pair_name}"),
        seed=demo.seed,
    )


def plain_text_records(records) -> list:
    """Records whose response is the plain text of the original (instruction, input, output):
    fine-tuning on them is language modelling on plain text (after a fixed short prompt)."""
    from sparcom_jax.data import Record

    return [Record(id=f"text-{r.id}", category=r.category, instruction="Text:",
                   output="\n\n".join(x for x in (r.instruction, r.input, r.output) if x))
            for r in records]


def _train_pair(demo: DemoConfig, pair, out: Path, tok, records) -> list[tuple[str, str]]:
    """Pretrain a tiny model briefly on plain text ("before"), instruction-tune it and
    export step 0, the intermediate and the final checkpoints. Returns [(name, hf dir)]."""
    from sparcom_jax import train as T
    from sparcom_jax.data import sample_balanced
    from sparcom_jax.models.config import ModelConfig
    from sparcom_jax.models.transformer import init_model

    arch = dict(pair.architecture)
    if arch.get("vocab_size") is None:
        arch["vocab_size"] = len(tok)
    for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
        arch.setdefault(k, getattr(tok, k))
    mcfg = ModelConfig.from_hf_config(arch, source=f"demo pair {pair.name}")
    model = init_model(mcfg, seed=demo.seed)
    held_out = sample_balanced(records, 2, seed=demo.seed + 7)
    with _timed(f"demo {pair.name}: pretraining {fmt_count(mcfg.param_count())} parameters on plain text"):
        res = T.finetune(model, plain_text_records(records), tok, demo.pretrain,
                         out / "train" / f"{pair.name}-pretrain", eval_records=plain_text_records(held_out),
                         progress=True)
    with _timed(f"demo {pair.name}: instruction fine-tuning"):
        T.finetune(res.model, records, tok, demo.finetune, out / "train" / f"{pair.name}-sft",
                   eval_records=held_out, progress=True)
    names = lambda s, f: f"{pair.name}-base" if s == 0 else (  # noqa: E731
        f"{pair.name}-chat" if s == f else f"{pair.name}-step{s}")
    return export_checkpoints(out / "train" / f"{pair.name}-sft", out / "checkpoints", names, tok)


def run_demo(out: str | os.PathLike, fast: bool = False, cfg: DemoConfig | None = None) -> dict[str, Any]:
    """The embedded end-to-end demo: tiny Llama and Mixtral-style pairs, trained and analysed.

    1. builds each tiny model with the shipped tokenizer, pretrains it briefly on
       plain text from the shipped data and saves the "before" checkpoint;
    2. instruction-fine-tunes it, saving intermediate and "after" checkpoints as
       HF directories under OUT/checkpoints/<name>/hf;
    3. collects, identifies, evaluates, compares (with the series) and runs the
       causal check for each pair (OUT/pairs/<pair>/);
    4. writes the report: OUT/report/index.html (both pairs), summary.json and
       figures (OUT/report/<pair>/figures).

    Args:
      out: output directory.
      fast: shrink everything (a minute on 2 cores; tests).
      cfg: a DemoConfig (default: `demo_config(fast)`).

    Returns:
      {"report": index.html, "summary": summary.json, "checkpoints": dir, "out": dir}.
    """
    from sparcom_jax.data import default_tokenizer, load_instructions

    cfg = cfg or demo_config(fast)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_resolved(cfg, out)
    t0 = time.perf_counter()
    tok = default_tokenizer()
    records = load_instructions(None)
    summaries, pages = {}, {}
    with compilation_cache(Path(os.environ.get("SPARCOM_JAX_CACHE", out / ".jax_cache"))):
        for pair in cfg.pairs:
            ckpts = _train_pair(cfg, pair, out, tok, records)
            exp = _pair_experiment(cfg, pair.name, ckpts)
            pout = out / "pairs" / pair.name
            pout.mkdir(parents=True, exist_ok=True)
            save_resolved(exp, pout)
            res = run_all(exp, pout)
            summaries[pair.name] = json.loads(Path(res["summary"]).read_text())
            pages[pair.name] = Path(res["report"])
    report = write_demo_report(out / "report", summaries, pages, title=cfg.report.title or "sparcom demo")
    log(f"demo finished in {time.perf_counter() - t0:.0f} s")
    return {"report": str(report), "summary": str(out / "report" / "summary.json"),
            "checkpoints": str(out / "checkpoints"), "out": str(out)}


def write_demo_report(rdir: Path, summaries: dict[str, dict], pages: dict[str, Path], title: str) -> Path:
    """One page for every pair: each pair's full report (figures and tables) under its heading.

    Copies each pair's report directory to rdir/<pair>/ and writes rdir/index.html
    and rdir/summary.json ({"pairs": {pair: summary}}).
    """
    import re
    import shutil

    from sparcom_jax.report.io import atomic_write, write_json

    rdir.mkdir(parents=True, exist_ok=True)
    parts = []
    head = None
    for name, page in pages.items():
        dst = rdir / name
        if dst.exists():
            shutil.rmtree(dst)
        shutil.copytree(page.parent, dst)
        html = page.read_text()
        if head is None:
            head = html[:html.index("<body>") + len("<body>")]
        body = html[html.index("<body>") + len("<body>"):html.rindex("</body>")]
        body = re.sub(r"<h1>(.*?)</h1>", rf'<h1 id="{name}">\1</h1>', body, count=1)
        body = body.replace('<figure id="', f'<figure id="{name}-')
        parts.append(f'<section class="pair">{body}<p><a href="{name}/index.html">{name} report alone</a>'
                     f" · files in <code>{name}/</code></p></section>")
    toc = "".join(f'<li><a href="#{n}">{n}</a></li>' for n in pages)
    head = re.sub(r"<title>.*?</title>", f"<title>{title}</title>", head or "<html><body>")
    doc = f"{head}<h1>{title}</h1><p>Model pairs:</p><ul>{toc}</ul>{''.join(parts)}</body></html>"
    atomic_write(rdir / "index.html", doc)
    write_json(rdir / "summary.json", {"pairs": summaries})
    return rdir / "index.html"
