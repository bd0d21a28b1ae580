"""Reopen a finished CLI run from Python: `open_run(OUT)` returns a `Run`.

A `sparcom run --out OUT` leaves its resolved config (OUT/config.yaml), the count
stores, each analysis stage's outputs with the fingerprint of what they were made
from, and the report (OUT/report/summary.json). `Run` gives them back as the stages
had them: the typed config, the summary, the counts of any model, and the analyses
rebuilt by the report stage's own function (`analyze_all`: the same records, split,
rule and draws), checked against the fingerprint the report stored. Analyses that
would disagree with the report (the config or the counts changed since it was written)
are refused with the difference named, never handed back; the identify, evaluate and
compare outputs not made as the report was are named (`Run.outdated`), and reading
compare's files through the run is refused for them.

Opening reads only: nothing is written into OUT (no lock, no config.yaml). The config's
paths are absolute, as the command read them (`save_resolved`); a run saved before that
kept relative paths, which are read from the current directory. One that is not there is
refused when something that reads it is asked for (`Run.analyses`, `counts`, `ablations`,
`stages`: `_check_relative_paths`), not when the run is opened: its summary, report,
environment and stored comparison need none.
"""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path
from typing import Any

from sparcom_jax.config import ConfigError, ExperimentConfig, load_config, read_yaml, relative_paths
from sparcom_jax.errors import LockedError, MissingPathError, StaleResultError
from sparcom_jax.fileio import LOCK_NAME, DirLock
from sparcom_jax.fingerprint import FINGERPRINT_FILE, environment_line, read_fingerprint, with_method
from sparcom_jax.pipeline.common import counts_root, log, model_list, safe
from sparcom_jax.pipeline.provenance import changes, stale
from sparcom_jax.pipeline.stages import (
    ABLATION_SECTIONS, Analyses, _ablation_file, _analysis_fingerprint, _analysis_kwargs, ablation_models,
    analyze_all, count_jobs, fine_tunes, load_ablations, open_model_counts,
)

# The config's path fields listing the finished stages reads (`Run.stages`): where the counts are, and
# the records a fine-tuned model's train part is checked against.
_STAGES_READ = ("collect.store", "data.", "train_data.")

# The stages whose finished outputs a reopened run lists, each with the file that marks it done
# (collect and ablate are judged by their stores and result files: `_done_stages`).
_MARKS = {"finetune": "checkpoints/series.json", "identify": f"identify/{FINGERPRINT_FILE}",
          "evaluate": f"evaluate/{FINGERPRINT_FILE}", "compare": f"compare/{FINGERPRINT_FILE}",
          "report": "report/summary.json"}


def open_run(out: str | Path) -> "Run":
    """Reopen the output directory of a finished `sparcom run` (or of its stages up to `report`).

    Args:
      out: the --out directory of the run.

    Returns:
      A `Run`; its analyses are rebuilt on first use of `Run.analyses`.

    Raises:
      ConfigError: `out` is not a sparcom output directory, its run never finished (naming
        the first missing stage and the command that finishes it), or its config no longer loads.
      StaleResultError: the report was written by another version of the output format.
      LockedError: a sparcom command is writing into `out` now.
    """
    out = Path(out)
    _not_inside_a_run(out)
    _not_being_written(out)
    cfg = _load_config(out)
    summary_path = out / _MARKS["report"]
    if not summary_path.is_file():
        _check_relative_paths(cfg, out / "config.yaml")  # (naming the stage that is missing reads them)
        missing = next((s for s in _expected_stages(cfg, out) if s not in _done_stages(cfg, out)), "report")
        raise ConfigError(
            f"{out}: this run never finished: its {missing} stage has no output ({_where(missing, cfg, out)}), so there "
            f"is no report to reopen; finish it with `sparcom run --config {out / 'config.yaml'} --out {out}` "
            "(it reuses the finished stages), then open it again")
    try:
        summary = json.loads(summary_path.read_text())
    except ValueError as e:  # written atomically by the report stage: changed by something else since
        raise ConfigError(f"{summary_path}: not readable JSON ({e}); write the report again with `sparcom report "
                          f"--config {out / 'config.yaml'} --out {out}`") from None
    _check_format(summary, summary_path, out)
    return Run(out, cfg, summary)


def _not_inside_a_run(out: Path) -> None:
    """Refuse a file, or a directory without config.yaml, with the run directory it lies in when
    there is one (OUT/report/summary.json, OUT/config.yaml, OUT/report/ for OUT): a file was
    read as a run locked by a command that never ran ("pid None ... since 1970")."""
    if not out.exists() or (out / "config.yaml").is_file():
        return  # (`_load_config` says what is missing)
    run = next((p for p in out.parents if (p / "config.yaml").is_file() and (p / "report").is_dir()), None)
    what = "a file, not a run's output directory" if not out.is_dir() else None
    if run is not None:
        raise ConfigError(f"{out}: {what or 'inside the run ' + str(run) + ', not its output directory'}; open the "
                          f"run's directory: sj.open_run({str(run)!r})")
    if what:
        raise ConfigError(f"{out}: {what}; pass the --out directory of a `sparcom run`")


def _not_being_written(out: Path) -> None:
    """Refuse a run directory that a live sparcom command holds (OUT/.sparcom.lock): its outputs
    may change, or be half replaced, while they are read."""
    held = DirLock(out, "run").held_by()
    if held is not None:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(held.get("started", 0)))
        raise LockedError(f"{out}: a sparcom command is writing into this run now (pid {held.get('pid')} on host "
                          f"{held.get('host')}, since {since}: {held.get('command', '?')}), so its outputs may change "
                          f"while they are read; open it when that command has finished (if it is gone, delete "
                          f"{out / LOCK_NAME})")


def _load_config(out: Path) -> ExperimentConfig:
    """OUT/config.yaml as the typed config, or an error that says what `out` is instead."""
    path = out / "config.yaml"
    if not path.is_file():
        if out.is_dir() and any((out / d).exists() for d in ("counts", "train", "identify")):
            raise ConfigError(f"{out}: no config.yaml: no stage of the run here has finished (each writes it when "
                              "it does); finish the run with `sparcom run --config YOUR_CONFIG.yaml --out "
                              f"{out}`, then open it again")
        raise ConfigError(f"{out}: not a sparcom output directory (no config.yaml{'' if out.is_dir() else ', no such directory'}); "
                          "pass the --out directory of a `sparcom run`")
    raw = read_yaml(path)
    if isinstance(raw, dict) and "pairs" in raw and "name" not in raw:
        pairs = sorted(p.name for p in (out / "pairs").glob("*") if (p / "config.yaml").is_file())
        raise ConfigError(f"{out}: the output of `sparcom demo`, one run per model pair; open one pair's run: "
                          + (", ".join(f"sj.open_run({str(out / 'pairs' / p)!r})" for p in pairs) or "none finished"))
    try:
        return load_config(path)
    except ConfigError as e:  # a key or value this version does not know
        raise ConfigError(f"{e} (open_run reads {path} as this sparcom_jax's config: one written by another "
                          "sparcom_jax must be opened with that version, one edited since must be put back)") from None


def _check_relative_paths(cfg: ExperimentConfig, path: Path, needs: tuple[str, ...] | None = None) -> None:
    """Refuse a relative path of the config that names nothing from the current directory, among
    the fields `needs` (dotted names or their prefixes, "data." for every data path; None: all).

    A run saves its config with absolute paths (`save_resolved`); one saved before that
    keeps the paths as they were given, relative to a directory it did not record. They
    are read from the current directory, as the command read them; one that is not there
    means the run was started elsewhere (or the file is gone).
    """
    missing = {k: v for k, v in _relative(cfg).items()
               if not Path(v).exists() and (needs is None or k.startswith(needs))}
    if missing:
        k, v = next(iter(missing.items()))
        what = (f"{k} is the relative path {v!r}, and {Path.cwd() / v} does not exist"
                + (f" (nor do {', '.join(list(missing)[1:])})" if len(missing) > 1 else ""))
        raise MissingPathError(
            f"{path}: {what}: this run was saved before sparcom_jax recorded absolute paths, so the directory it was "
            "started in is not known; open it from that directory, or write the absolute paths into the config file",
            file=path, what=what)


def _relative(cfg: ExperimentConfig) -> dict[str, str]:
    """The config's relative paths that open_run reads (not out_dir: the run's OUT is given to it)."""
    return {k: v for k, v in relative_paths(cfg).items() if k != "out_dir"}


def _relative_note(cfg: ExperimentConfig) -> str:
    """What an error of a run whose config names relative paths adds (they were read from here)."""
    rel = _relative(cfg)
    if not rel:
        return ""
    return (f" (config.yaml names {', '.join(f'{k} {v!r}' for k, v in rel.items())} relative to the directory the "
            f"run was started in, read here from {Path.cwd()}: if the run was started elsewhere, open it from there)")


def _check_format(summary: dict[str, Any], path: Path, out: Path) -> None:
    """Refuse a report of another summary format, or one without the fingerprint of its analyses."""
    from sparcom_jax.analysis.study import SUMMARY_VERSION

    again = f"write the report again with this sparcom_jax: `sparcom run --config {out / 'config.yaml'} --out {out}`"
    version = summary.get("summary_version")
    if version != SUMMARY_VERSION:
        raise StaleResultError(f"{path}: summary_version {version!r}, written by another sparcom_jax (this one "
                               f"reads version {SUMMARY_VERSION}); open it with the sparcom_jax that wrote it, or "
                               f"{again}")
    if not isinstance(summary.get("fingerprint"), dict):
        raise StaleResultError(f"{path}: no fingerprint of the analyses it shows (written by an earlier "
                               f"sparcom_jax), so whether they can be rebuilt as they were cannot be told; {again}")


def _expected_stages(cfg: ExperimentConfig, out: Path) -> list[str]:
    """The stages `sparcom run` runs for `cfg`, in order (compare with two models or more)."""
    try:
        several = len(model_list(cfg, out)) > 1
    except ConfigError:  # fine-tuning unfinished: it is the missing stage
        several = True
    return [s for s, wanted in (("finetune", fine_tunes(cfg)), ("collect", True), ("identify", True),
                                ("evaluate", True), ("compare", several), ("ablate", cfg.ablation.enabled),
                                ("report", True)) if wanted]


def _done_stages(cfg: ExperimentConfig, out: Path) -> list[str]:
    """The stages whose outputs are in `out`, in run order."""
    from sparcom_jax.pipeline.common import STAGES

    done = {s for s, mark in _MARKS.items() if (out / mark).is_file()}
    if fine_tunes(cfg) and "finetune" not in done:
        return []  # the models to count are not there yet
    if all(_counted(counts_root(cfg, out) / safe(j.label)) for j in count_jobs(cfg, out)):
        done.add("collect")
    if any(_ablation_file(out, s.label, k).is_file() for s in ablation_models(cfg, out) for k in ABLATION_SECTIONS):
        done.add("ablate")
    return [s for s in STAGES if s in done]


def _counted(root: Path) -> bool:
    """Whether a model's count directory holds its finished store(s) (one, or one per process)."""
    from sparcom_jax.stats.store import is_complete

    return all(is_complete(p) for p in sorted(root.glob("process_*")) or [root])


def _where(stage: str, cfg: ExperimentConfig, out: Path) -> Path:
    """Where the output that marks `stage` done would be."""
    return counts_root(cfg, out) if stage == "collect" else out / _MARKS.get(stage, stage)


class Run:
    """A finished CLI run, reopened (`open_run`).

    Attributes:
      out: the output directory.
      config: OUT/config.yaml as the typed `ExperimentConfig` the stages ran with.
      summary: the report's summary.json (dict).
      report_dir: OUT/report (index.html, tables, figures).
      stages: the stages whose outputs are in `out`, in run order.
      environment: the software the report was made with (summary.json's "environment":
        python, package versions, JAX backend and devices, sparcom_jax's commit); None for a
        report of a sparcom_jax that did not record it.
      environment_changes: the outputs the report reused that were made under other versions
        of what can change a number ([{"stage", "output", "part", "package", "old", "new",
        "matters"}]: "matters" says whether the change can alter a number of the report; [] when
        none, None when not recorded).
      environment_parts: the outputs made under several environments (a collection or
        fine-tuning run resumed under other software: [{"stage", "output", "parts": [{"part",
        "environment"}], "text"}], "text" e.g. "counts/base made under jax 0.10.1 (chunks 0-3)
        and jax 0.10.2 (chunks 4-7)"; [] when none, or the report predates the list).
    """

    def __init__(self, out: Path, config: ExperimentConfig, summary: dict[str, Any]):
        self.out, self.config, self.summary = out, config, summary
        self.report_dir = out / "report"
        self.environment = summary.get("environment")
        self.environment_changes = summary.get("environment_changes")
        self.environment_parts = summary.get("environment_parts") or []

    def _needs(self, fields: tuple[str, ...] | None = None) -> None:
        """Refuse, naming the field, the path tried and the fix, a relative path of the config that
        what is asked for reads and that is not there (`_check_relative_paths`; `fields`: None, all)."""
        _check_relative_paths(self.config, self.out / "config.yaml", fields)

    @functools.cached_property
    def stages(self) -> list[str]:
        """The stages whose outputs are in `out`, in run order (read from the count stores' directory
        and, for a fine-tuned run with a split, the records it was tuned on)."""
        self._needs(_STAGES_READ)
        return _done_stages(self.config, self.out)

    @property
    def models(self) -> list[str]:
        """The models of the study in series order (base first), as the report names them."""
        return list(self.summary.get("models") or {})

    def counts(self, model: str, template: str | None = None):
        """The stored counts of `model` (a model of the study, or a control such as "tuned under
        plain template"; `template`: the model counted under that template), read lazily, after
        checking that they were collected with this run's config (`open_model_counts`).

        Raises:
          KeyError: no counts of that model (and template) in this run; the message lists them.
          StaleResultError: the stored counts were made with other inputs or settings.
        """
        self._needs()
        jobs = [j for j in count_jobs(self.config, self.out) if model in (j.label, j.spec.label)
                and template in (None, j.template)]
        if not jobs:
            have = ", ".join(f"{j.label!r} ({j.template} template)" for j in count_jobs(self.config, self.out))
            raise KeyError(f"{self.out}: no counts of {model!r}" + (f" under the {template} template" if template else "")
                           + f"; this run counted {have}")
        j = next((j for j in jobs if j.label == model), jobs[0])
        return open_model_counts(self.config, self.out, j.spec, j.template, j.label, j.dtype, j.gate_dtype)

    @functools.cached_property
    def analyses(self) -> Analyses:
        """Every model's `ModelAnalysis` (`.models`, in series order) and the controls'
        (`.controls`), rebuilt as the report stage built them (`analyze_all`) and checked
        against the fingerprint the report stored. Output directories of the other stages that
        were not made as the report was (`outdated`) are named in the log: these analyses are
        the report's, their files are not.

        Raises:
          StaleResultError: the config or the counts changed since the report was written (the
            message names the file, what differs and the fix).
          ConfigError: the counts are gone or incomplete.
        """
        _not_being_written(self.out)
        self._check_settings()  # before any count is read: a changed rule is refused at once
        self._needs()
        try:
            an = analyze_all(self.config, self.out, full=True)
        except ValueError as e:  # counts removed, unfinished or made with other settings (or other files read)
            raise type(e)(f"{self.out}: the report's analyses cannot be rebuilt: {e}{_relative_note(self.config)}"
                          ) from None
        # The report's own fingerprint decides: these analyses are handed back only as it was made.
        stale(self.report_dir / "summary.json", self.summary["fingerprint"],
              _analysis_fingerprint(self.config, an, True), overwrite=False, fix=self._fix())
        for where, what in self.outdated.items():  # files on disk these analyses do not describe
            log(f"{where}: not made with the report's settings and counts ({what}), so its files are not what the "
                f"report shows; these analyses are (the report's set lists are in {self.report_dir / 'sets'}); "
                f"{self._update()} brings it up to date")
        return an

    @functools.cached_property
    def outdated(self) -> dict[Path, str]:
        """The stage output directories (identify, evaluate, compare) whose files were made with other
        settings or counts than the report, each with what differs; {} when all are the report's.

        `sparcom report` rerun with other settings rewrites the report (and compare/), not
        identify/ or evaluate/: their files then disagree with the report, while `analyses`
        (checked against the report) do not. `comparison` and `series` refuse a compare/ listed
        here. Read from the stored fingerprints: nothing is recomputed.
        """
        report = self.summary["fingerprint"]
        # identify/ holds the sets alone: the report's rule and counts, without its uncertainty settings.
        sets = with_method({"identify": report.get("identify"), "analysis": _analysis_kwargs(self.config, False),
                            "counts": report.get("counts")})
        found = {}
        for stage, current in (("identify", sets), ("evaluate", report), ("compare", report)):
            stored = read_fingerprint(self.out / stage)  # None: not run in this directory (`sparcom report` alone)
            what = None if stored is None else changes(stored, current)
            if what is not None:
                found[self.out / stage] = what
        return found

    def _check_settings(self) -> None:
        """Refuse a config whose rule or analysis settings are not the report's (no count read)."""
        current = with_method({"identify": self.config.identify.to_rule().to_dict(),
                               "analysis": _analysis_kwargs(self.config, True)})
        stored = {k: self.summary["fingerprint"].get(k) for k in current}
        stale(self.report_dir / "summary.json", stored, current, overwrite=False, fix=self._fix())

    def _fix(self) -> str:
        cfg = self.out / "config.yaml"
        return (f"{cfg} (the settings of the last command run in {self.out}) or the counts changed since; bring "
                f"the outputs up to date with {self._update()} (it reuses what still matches), or put back the "
                "settings they were made with")

    def _update(self) -> str:
        return f"`sparcom run --config {self.out / 'config.yaml'} --out {self.out}`"

    @property
    def comparison(self) -> dict[str, Any] | None:
        """The before/after comparison the compare stage stored (OUT/compare/comparison.json),
        loaded as it is; None with one model."""
        return self._compared("comparison")

    @property
    def series(self) -> dict[str, Any] | None:
        """The comparison along the checkpoint series (OUT/compare/series.json); None without one."""
        return self._compared("series")

    def _compared(self, name: str) -> dict[str, Any] | None:
        f = self.out / "compare" / f"{name}.json"
        if not f.is_file():
            return None
        # Made from what the report was made from, or refused (both stages fingerprint the same analyses).
        stale(self.out / "compare" / FINGERPRINT_FILE, read_fingerprint(self.out / "compare"),
              self.summary["fingerprint"], overwrite=False, fix=self._fix())
        return json.loads(f.read_text())

    @functools.cached_property
    def ablations(self) -> dict[tuple[str, str], Any]:
        """The causal checks the ablate stage stored, {(model, kind): AblationResult}, loaded (not
        recomputed) after the report stage's checks against this run's config and counts
        (`load_ablations`: they need `analyses`); {} when the run made none."""
        self._needs()
        return load_ablations(self.config, self.out, self.analyses)

    def __repr__(self) -> str:
        models = self.summary.get("models") or {}
        sizes = {}
        for name, m in models.items():
            sec = next((v for k, v in m.items() if k != "meta" and isinstance(v, dict)), {})
            sizes[name] = (sec.get("n_instructions"), sum(1 for v in (sec.get("n_per_category") or {}).values() if v))
        shown = (f"{n} records, {c} categories" for n, c in dict.fromkeys(sizes.values()))
        built = "built" if "analyses" in self.__dict__ else "rebuilt on first use of .analyses"
        try:
            stages = ", ".join(self.stages)
        except MissingPathError as e:  # a relative path the listing reads is not here
            stages = f"not listed here ({e.what})"
        lines = [f"Run({str(self.out)!r}): experiment {self.summary.get('experiment', self.config.name)!r}",
                 f"  models: {', '.join(models) or 'none'} ({'; '.join(shown)})",
                 f"  controls: {', '.join(self.summary.get('controls') or {}) or 'none'}",
                 f"  stages: {stages}",
                 f"  report: {self.report_dir / 'index.html'}",
                 f"  environment: {environment_line(self.environment)}"
                 + (f" ({len(self.environment_changes)} reused output(s) made under other versions: "
                    ".environment_changes)" if self.environment_changes else ""),
                 *(f"  made in parts: {p['text']}" for p in self.environment_parts),
                 f"  analyses: {built} (checked against the report)"]
        return "\n".join(lines + self._outdated_lines())

    def _outdated_lines(self) -> list[str]:
        """The repr's lines on the output directories that are not the report's (`outdated`)."""
        by_what: dict[str, list[str]] = {}
        for where, what in self.outdated.items():
            by_what.setdefault(what, []).append(str(where))
        return [f"  not the report's: {', '.join(ds)} ({what}); the analyses are the report's (its set lists: "
                "report/sets/)" for what, ds in by_what.items()]
