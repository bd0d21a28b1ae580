"""What every stage shares: logging, the output directory, the mesh, models, records.

Nothing here reads weights or starts a device at import; JAX and the heavier
library modules are imported inside the functions that need them.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

from sparcom_jax.config import ConfigError, DemoConfig, ExperimentConfig, MeshSpec, ModelSpec, dump_config
from sparcom_jax.console import log
from sparcom_jax.fileio import relative_note
from sparcom_jax.fingerprint import stat_key

STAGES = ("finetune", "collect", "identify", "evaluate", "compare", "ablate", "report")


def stages_run(stage: str) -> tuple[str, ...]:
    """The stages a command runs: every stage for "run", else `stage` alone."""
    return STAGES if stage == "run" else (stage,)


# --------------------------------------------------------------------------- #
# Progress and formatting
# --------------------------------------------------------------------------- #

def log_stale_lock(lock: Any) -> None:
    """Say so when taking `lock` (a `DirLock`) took over the lock of a run whose process is
    gone (killed, or its machine restarted): that run's work may be unfinished."""
    held = getattr(lock, "stale_taken", None)
    if held:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(held.get("started", 0)))
        log(f"{lock.directory}: an earlier run (pid {held.get('pid')}, started {since}) stopped without finishing; "
            "its finished work is checked and reused, the rest is resumed or redone")


@contextlib.contextmanager
def timed(what: str) -> Iterator[None]:
    """Log "<what> ..." on entry and "<what>: done in N s" when the block succeeds."""
    t = time.perf_counter()
    log(f"{what} ...")
    yield
    log(f"{what}: done in {time.perf_counter() - t:.1f} s")


def safe(name: str) -> str:
    """`name` as a file name (the report's rule)."""
    from sparcom_jax.report.tables import safe_name

    return safe_name(name)


# --------------------------------------------------------------------------- #
# Processes, output directory, mesh
# --------------------------------------------------------------------------- #

def barrier(name: str) -> None:
    """Wait until every process of a multi-host run gets here (no-op on one process).

    Used after process 0 writes shared outputs (exported checkpoints) that the
    other processes read next.
    """
    if "jax" not in sys.modules:
        return
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def is_primary() -> bool:
    """Whether this process writes shared outputs (process 0 of a multi-host run)."""
    if "jax" not in sys.modules:
        return True
    import jax

    return jax.process_index() == 0


@contextlib.contextmanager
def primary_writes(what: str) -> Iterator[bool]:
    """A block of writes process 0 makes alone (shared outputs), left by every process together.

    Yields whether this process writes (`is_primary`). An error in the block (a full disk
    under the report) is raised on every process as the block ends (`raise_together`): the
    others, which wrote nothing, stop there naming process 0's error. Without it they met
    process 0's exit in their next collective, on CPU as a "connection closed" error that
    did not name the cause, on TPU or GPU at jax.distributed's heartbeat timeout (100 s).
    Every process must enter the block, and the block must hold no collective. No barrier
    is needed after it: no process passes `raise_together`'s gather before process 0 has
    left the block, so its writes are done once any process is past it.

    Args:
      what: what process 0 writes, for the others' message.
    """
    from sparcom_jax.parallel.processes import together

    with together(what):
        yield is_primary()


def check_shared(out: Path, what: str = "--out") -> None:
    """Refuse an output directory that the processes of a multi-host run do not all see.

    Process 0 merges every process's count store, reads the checkpoints it exported and
    writes the report, all under `out`; a directory local to each host (the default
    runs/<name> on each TPU VM worker) would leave it with its own share only. Process 0
    writes a probe file that every process must then find. No-op on one process.

    Args:
      out: the directory (created when missing).
      what: the setting that names it, for the message ("--out", "collect.store").

    Raises:
      ConfigError: naming the processes that do not see it, on every process.
    """
    if "jax" not in sys.modules:
        return
    import jax

    if jax.process_count() == 1:
        return
    import secrets

    import numpy as np
    from jax.experimental import multihost_utils

    from sparcom_jax.parallel.processes import gather, together

    token = int(multihost_utils.broadcast_one_to_all(np.int32(secrets.randbits(31))))
    out = Path(out)
    with together(f"creating {what} {out}"):
        out.mkdir(parents=True, exist_ok=True)
    probe = out / f".sparcom-shared-{token:08x}"
    with primary_writes(f"writing a probe file in {out}") as writes:
        if writes:
            probe.write_text("written by process 0 to check that every process sees this directory\n")
    seen = gather(probe.is_file()).reshape(-1)  # every process has looked once this returns
    if is_primary():
        probe.unlink(missing_ok=True)
    if not seen.all():
        blind = ", ".join(str(k) for k in np.flatnonzero(~seen.astype(bool)))
        raise ConfigError(
            f"{'output directory' if what == '--out' else what} {out}: process(es) {blind} of "
            f"{jax.process_count()} do not see the files process 0 writes there; a multi-host run needs {what} on a "
            "file system every host mounts (NFS, e.g. Filestore), since process 0 reads every process's counts "
            "from it")


def out_dir(cfg: ExperimentConfig | DemoConfig, out: str | os.PathLike | None) -> Path:
    """The output directory: --out, else the config's out_dir, else runs/<name>."""
    if out is not None:
        return Path(out)
    if cfg.out_dir:
        return Path(cfg.out_dir)
    return Path("runs") / getattr(cfg, "name", "demo")


def save_resolved(cfg: Any, out: Path) -> Path:
    """Write the resolved config next to the outputs (OUT/config.yaml), its relative paths
    made absolute against the current directory, as the command read them: the run's files
    are found from any directory (`sparcom run --config OUT/config.yaml`, `open_run`)."""
    with primary_writes(f"writing {out / 'config.yaml'}") as writes:
        if writes:
            dump_config(cfg, out / "config.yaml", base=os.getcwd())
    return out / "config.yaml"


def init_distributed(mesh: MeshSpec) -> bool:
    """Call `jax.distributed.initialize` for a multi-process run (before any other JAX call).

    On TPU VMs every argument is detected; elsewhere `mesh.coordinator`,
    `mesh.num_processes` and the SPARCOM_PROCESS_ID (or JAX_PROCESS_ID)
    environment variable give them.

    A process that stops before it joins (a config its host cannot read, a host where
    the command never started) keeps the others waiting here: after `mesh.init_timeout`
    seconds they stop with one line saying so and what to check (`_join_watch`), where
    jax aborted them with a C++ stack trace that named no cause.

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
    # jax's own deadline comes later than ours: at it, it aborts the process.
    kwargs["initialization_timeout"] = mesh.init_timeout + _JAX_DEADLINE_AFTER
    try:
        with _join_watch(mesh):
            jax.distributed.initialize(**kwargs)
    except ValueError as e:  # no coordinator found (jax's RuntimeErrors, e.g. a timeout, say their own cause)
        if mesh.coordinator:
            raise
        raise ConfigError(
            f"mesh.distributed / mesh.num_processes={mesh.num_processes}: jax.distributed could not find the "
            f"other processes on its own ({e}); that works on TPU VMs and under SLURM. Elsewhere set "
            "mesh.coordinator=HOST:PORT (process 0) and SPARCOM_PROCESS_ID in each process, or run on "
            "one host with mesh.distributed=false mesh.num_processes=1") from None
    log(f"jax.distributed: process {jax.process_index()} of {jax.process_count()}, "
        f"{jax.device_count()} devices")
    if mesh.num_processes > 1 and jax.process_count() != mesh.num_processes:  # found by jax (TPU VMs)
        log(f"note: mesh.num_processes={mesh.num_processes}, but jax.distributed found {jax.process_count()} "
            "processes: the run uses those it found (results do not depend on their number); set "
            f"mesh.num_processes={jax.process_count()} so that dry runs plan this pod (each host's devices, "
            "the model axis within a host, each host's merged counts)")
    return True


_JAX_DEADLINE_AFTER = 30


@contextlib.contextmanager
def _join_watch(mesh: MeshSpec) -> Iterator[None]:
    """Stop this process with a one-line error, exit status 2, when the block (joining the
    other processes) has not ended after `mesh.init_timeout` seconds."""
    import threading

    joined = threading.Event()
    n = f"not all {mesh.num_processes} processes" if mesh.num_processes > 1 else "not every process"

    def watch():
        if joined.wait(mesh.init_timeout):
            return
        where = f" at the coordinator {mesh.coordinator}" if mesh.coordinator else ""
        print(f"sparcom: error: jax.distributed: {n} joined within {mesh.init_timeout} s"
              f"{where} (mesh.init_timeout); check that every host started the same command with the same "
              "mesh.coordinator and mesh.num_processes (and its own SPARCOM_PROCESS_ID), and read the log of each "
              "host that did not join: a process that stopped before it joined (a config or file its host cannot "
              "read) says why there", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(2)

    threading.Thread(target=watch, name="sparcom-join-watch", daemon=True).start()
    try:
        yield
    finally:
        joined.set()


def resolve_mesh(mesh: MeshSpec, devices: int | None = None) -> tuple[int, int, int]:
    """(devices, data, model) of the mesh, by arithmetic only (no devices needed).

    Args:
      mesh: the config's mesh settings.
      devices: device count to plan for; default mesh.devices, else data * model
        when data is set, else the devices JAX sees.

    Raises:
      ConfigError: when the axes do not factor the device count.
    """
    from sparcom_jax.parallel.mesh import mesh_shape

    n = devices or mesh.devices or (mesh.data * mesh.model if mesh.data else None)
    if n is None:
        import jax

        n = jax.device_count()
    data, model = mesh_shape(n, mesh.data, mesh.model, mesh.num_processes)
    return n, data, model


def make_mesh(mesh: MeshSpec, *, local: bool = False):
    """A real ("data", "model") Mesh over the visible devices, or None for one device.

    `local`: over this process's devices only (its 1/P of the data axis), for work each
    process does alone (the causal check); the same as the whole mesh with one process.
    """
    import jax

    from sparcom_jax.parallel.mesh import make_mesh as _make

    if not local or jax.process_count() == 1:
        if jax.device_count() > 1:
            return _make(data=mesh.data, model=mesh.model)
        resolve_mesh(mesh, devices=1)  # axes one device cannot hold are refused, as the dry run refuses them
        return None
    if jax.local_device_count() == 1:
        return None
    data = None if mesh.data is None else mesh.data // jax.process_count()
    return _make(data=data, model=mesh.model, devices=jax.local_devices())


# --------------------------------------------------------------------------- #
# Models
# --------------------------------------------------------------------------- #

def with_vocab(arch: dict[str, Any], tokenizer=None) -> dict[str, Any]:
    """A copy of an HF-style architecture dict; vocab_size null = the tokenizer's size
    (default: the shipped tokenizer)."""
    arch = dict(arch)
    if arch.get("vocab_size") is None:
        if tokenizer is None:
            from sparcom_jax.data import default_tokenizer

            tokenizer = default_tokenizer()
        arch["vocab_size"] = len(tokenizer)
    return arch


def _init_config(spec: ModelSpec, tokenizer=None):
    from sparcom_jax.models.config import ModelConfig

    return ModelConfig.from_hf_config(with_vocab(spec.init, tokenizer), source=f"{spec.label}.init")


def has_weights(spec: ModelSpec) -> bool:
    """Whether the model's directory is there (it has a config.json)."""
    return bool(spec.path) and (Path(spec.path) / "config.json").is_file()


def model_config(spec: ModelSpec, cfg: ExperimentConfig | None = None):
    """(ModelConfig, where it came from): its config.json, else its `init` dict, else `architecture`.

    Raises:
      ConfigError: when none of them is available.
    """
    from sparcom_jax.models.config import ModelConfig

    if has_weights(spec):
        return ModelConfig.from_pretrained(spec.path), f"{spec.path}/config.json"
    if spec.init is not None:
        return _init_config(spec), f"{spec.label}.init (random)"
    if cfg is not None and cfg.architecture is not None:
        return ModelConfig.from_hf_config(cfg.architecture, source="architecture"), "architecture (config)"
    where = f"no config.json in {spec.path}" if spec.path else "no path"
    raise ConfigError(f"model {spec.label!r}: {where} and no `architecture:` block in the config; "
                      "download the weights or add the published config.json fields under architecture:")


def require_models(specs: Sequence[ModelSpec]) -> None:
    """Fail before any work when a model directory is missing (or a spec has neither path nor init)."""
    for spec in specs:
        if spec.path and not has_weights(spec):
            p = Path(spec.path)
            what = ("has no config.json" if p.is_dir() else "is a file, not a Hugging Face model directory"
                    if p.exists() else f"does not exist{relative_note(p)}")
            raise ConfigError(
                f"model {spec.label!r}: {spec.path} {what}; point path at the model's directory, or download "
                "it first"
                + (f" (huggingface-cli download {spec.hub_id} --local-dir {spec.path})" if spec.hub_id else ""))
        if not spec.path and spec.init is None:
            raise ConfigError(f"model {spec.label!r}: set path (a Hugging Face directory) or init")


def tokenizing_stages(cfg: ExperimentConfig) -> tuple[str, ...]:
    """The stages that read each model's tokenizer under `cfg`.

    collect, ablate and finetune tokenize records under every scope. Under data.scope "content"
    every stage that reads counts does too: the records' content caps come from every model's
    tokenizer (`sparcom_jax.pipeline.stages.study_content_caps`), so then every stage does."""
    return STAGES if cfg.data.scope == "content" else ("collect", "ablate", "finetune")


def require_tokenizers(cfg: ExperimentConfig, specs: Sequence[ModelSpec], stages: Sequence[str]) -> None:
    """Fail before any work when one of `stages` reads the tokenizer (`tokenizing_stages`) of a
    model whose directory is there without its tokenizer files: the run would stop at that model,
    after the ones before it. The dry run and every stage's preflight make this one check."""
    if not set(tokenizing_stages(cfg)) & set(stages):
        return
    from sparcom_jax.checkpoints.hf import has_tokenizer
    from sparcom_jax.data.tokenizer import missing_tokenizer

    for s in specs:
        if has_weights(s) and not has_tokenizer(s.path):
            raise ConfigError(f"model {s.label!r}: {missing_tokenizer(s.path)}")


def check_model_dirs(cfg: ExperimentConfig, specs: Sequence[ModelSpec], stages: Sequence[str], *,
                     weights: bool = True) -> None:
    """Fail before any work when one of `stages` loads a model (finetune, collect, ablate) whose
    directory is here but cannot be used: its config.json (not JSON, a field missing, a model_type
    not supported), its weights (no *.safetensors, a shard the index names missing, a tensor
    missing, unexpected, quantized or of a shape config.json does not imply: `check_checkpoint`;
    not with `weights=False`, as a dry run plans before the weights are downloaded) or, under the
    chat template, a tokenizer without one. The run found each only when it reached that model,
    after collecting the ones before it (hours for a 7B model). Reads no tensor, only the
    safetensors headers."""
    if not {"finetune", "collect", "ablate"} & set(stages):
        return
    from sparcom_jax.checkpoints.hf import check_checkpoint, has_tokenizer
    from sparcom_jax.models.config import ModelConfig
    from sparcom_jax.pipeline.provenance import spec_tokenizer

    for s in (s for s in specs if has_weights(s)):
        try:
            check_checkpoint(s.path) if weights else ModelConfig.from_pretrained(s.path)
        except ValueError as e:  # (ConfigError, CheckpointError: they name the file)
            raise ConfigError(f"model {s.label!r}: {e}") from None
        if template_for(s, cfg) == "chat" and has_tokenizer(s.path) and not spec_tokenizer(s).chat_template:
            raise ConfigError(
                f"model {s.label!r}: the chat template is its prompt template, but its tokenizer ({s.path}) has "
                "none (a base model's usually has none); set its template: plain in the config, or add the chat "
                "template of the model it was tuned as (chat_template.jinja, or chat_template in "
                "tokenizer_config.json)")


def load_spec_model(spec: ModelSpec, dtype: str = "float32", mesh=None, moe_impl: str = "auto",
                    gate_dtype: str | None = None):
    """Load a model from its HF directory, or build it from `init` (random weights).

    `gate_dtype` ("float32" or None): compute the gate projections in float32 in a
    bfloat16 model (only their sign decides the counts). The weights are then kept in
    float32 too: bf16 products already accumulate in float32, so a float32 gate over
    bf16 weights would give exactly the bf16 gate's signs."""
    from sparcom_jax.checkpoints.hf import load_model

    require_models([spec])
    extra = {"gate_dtype": gate_dtype, "param_dtype": "float32"} if gate_dtype else {}
    if spec.path:
        return load_model(spec.path, dtype=dtype, mesh=mesh, moe_impl=moe_impl, **extra)
    from sparcom_jax.data import default_tokenizer
    from sparcom_jax.models.transformer import init_model

    tok = default_tokenizer()
    model = init_model(_init_config(spec, tok), seed=spec.seed, dtype=dtype, moe_impl=moe_impl, **extra)
    model.tokenizer = tok
    model.source_path = None
    return model


def model_list(cfg: ExperimentConfig, out: Path, *, finetune_pending: bool = False) -> list[ModelSpec]:
    """Base, series and fine-tuned models; a `finetune` run's checkpoints fill in when
    the config names no fine-tuned model.

    Args:
      finetune_pending: this command fine-tunes before it reads the models (`run`), so an
        unfinished fine-tuning run in OUT is what it will finish.

    Raises:
      ConfigError: OUT holds a fine-tuning run that has not finished (without
        `finetune_pending`): the stage would analyse the base model alone.
    """
    from sparcom_jax.fingerprint import FINGERPRINT_FILE

    if cfg.finetuned is not None:
        check_model_names(cfg)
        return cfg.models()
    manifest = out / "checkpoints" / "series.json"
    if manifest.is_file():
        check_tuned_on_train_part(cfg, out)
        items = json.loads(manifest.read_text())
        return [cfg.base] + [ModelSpec(name=d["name"], path=d["path"], template=cfg.train.template) for d in items]
    if (out / "train" / FINGERPRINT_FILE).is_file() and not finetune_pending:
        raise ConfigError(
            f"{out / 'train'}: the fine-tuning run here has not finished (no {manifest}: stopped, or still "
            "running), so this stage would analyse the base model alone; run `sparcom finetune` with the same "
            "config and --out again to finish it, or set finetuned: to the model to compare with")
    return [cfg.base]


def check_model_names(cfg: ExperimentConfig) -> None:
    """Refuse two models of the config whose labels give one file name: their counts, sets
    and results would share one store, each model's collect overwriting the other's (a
    directory path ending in the same name, e.g. two .../hf exports, gives the same label).
    Dry runs check it too.

    Raises:
      ConfigError: naming both config entries and the fix.
    """
    fields = ["base", *[f"series[{i}]" for i in range(len(cfg.series))], "finetuned"]  # cfg.models() order
    seen: dict[str, tuple[str, str]] = {}
    for spec, field in zip(cfg.models(), fields):
        key = safe(spec.label)
        if key in seen:
            first, label = seen[key]
            raise ConfigError(
                f"{first} ({label!r}) and {field} ({spec.label!r}) would be stored under one name, {key!r} (a "
                "model's name, else the last part of its path), so one model's counts and results would "
                f"overwrite the other's; give each a distinct name ({field}.name=...)")
        seen[key] = (field, spec.label)


def check_tuned_on_train_part(cfg: ExperimentConfig, out: Path) -> None:
    """Refuse this run's fine-tuned checkpoints when they were tuned on records other than
    the current train part.

    The split deals records out by category totals, so adding or removing records can move
    others between parts: after the data changes, records the model was tuned on can sit in
    the identify or ablate part. `finetune` stores the ids it was tuned on (digested) in
    OUT/train/fingerprint.json; they must still be the train part.

    Raises:
      ConfigError: naming the directory and the fix.
    """
    from sparcom_jax.fingerprint import digest, read_fingerprint

    stored = read_fingerprint(out / "train")
    if cfg.data.split is None or not stored or "records" not in stored:
        return
    if stored["records"] != digest([r.id for r in train_records(cfg)]):
        raise ConfigError(
            f"{out / 'checkpoints'}: fine-tuned on other records than the train part of the current data "
            "(the records, data.split, data.group_by or train_data changed since `sparcom finetune`), so the "
            "identify and ablate parts may hold records the model was tuned on; re-run `sparcom finetune "
            "--overwrite`, or restore the data it was tuned on")


def template_for(spec: ModelSpec, cfg: ExperimentConfig) -> str:
    """The prompt template of a model: its own, else data.template."""
    return spec.template or cfg.data.template


def counts_root(cfg: ExperimentConfig, out: Path) -> Path:
    """Where the count stores live: collect.store, else OUT/counts."""
    return Path(cfg.collect.store) if cfg.collect.store else out / "counts"


# --------------------------------------------------------------------------- #
# Records and the identification rule
# --------------------------------------------------------------------------- #

_PARTS_CACHE: dict[str, tuple[dict, dict]] = {}


def _stamp(path) -> list:
    """[file, size, modification and change times, inode, device id] of every data file (`path`: one, a
    list, or None for the shipped set), so the cache below reads a file again once it is
    edited. The change time is set by the kernel on every write and cannot be set back: an
    edit that keeps the size, by a tool that restores the modification time (tar, rsync -t,
    cp -p), still changes it."""
    paths = [] if path is None else [path] if isinstance(path, (str, os.PathLike)) else list(path)
    files = [f for p in map(Path, paths) for f in (sorted(p.rglob("*")) if p.is_dir() else [p]) if f.is_file()]
    return [[str(f), *stat_key(f.stat())] for f in files]


def _load(d):
    from sparcom_jax.data import load_instructions

    return load_instructions(d.path, fields=d.fields, adapter=d.adapter, lenient=d.lenient,
                             category_map=d.category_map)


def record_parts(cfg: ExperimentConfig) -> tuple[dict[str, list], dict[str, Any]]:
    """The records of `cfg.data` cut into its disjoint parts, and what to report about them.

    Returns:
      ({"train", "identify", "ablate": records} — the same list three times when
      data.split is None), {"split", "seed", "grouped_by", "counts"} for summary.json.
      Near-duplicates (`data.group_by`, `group_records`) stay in one part.
    """
    from sparcom_jax.config import to_dict
    from sparcom_jax.data.splits import split_records, split_summary

    d = cfg.data
    key = json.dumps([to_dict(d), _stamp(d.path)], sort_keys=True, default=str)
    if key not in _PARTS_CACHE:
        records = _load(d)
        _warn_absent_categories(d, records)
        if d.split is None:
            parts = {"train": records, "identify": records, "ablate": records}
            info = {"split": None, "note": "no split: fine-tuning, identification and the causal check "
                                           "use the same records"}
        else:
            parts = split_records(records, d.split, d.split_seed, by=d.group_by, threshold=d.group_threshold)
            info = {"split": dict(d.split), "seed": d.split_seed, "grouped_by": grouping_rule(d),
                    "counts": split_summary(parts)}
        _PARTS_CACHE.clear()  # one config at a time
        _PARTS_CACHE[key] = (parts, info)
    return _PARTS_CACHE[key]


def _warn_absent_categories(d, records) -> None:
    """A category without a record makes a study of fewer categories: its sets, rows and
    columns stay empty. Said once per load, as invalid records skipped under data.lenient
    (or a file that never had them) leave no other trace of it before the report."""
    import warnings

    from sparcom_jax.categories import CATEGORIES, SHORT_NAMES
    from sparcom_jax.data import DataWarning

    there = {r.category for r in records}
    absent = [c for c in CATEGORIES if c not in there]
    if absent:
        warnings.warn(f"{d.path or 'the shipped set'}: no record of {', '.join(f'{SHORT_NAMES[c]} ({c})' for c in absent)}: "
                      f"the study covers {len(CATEGORIES) - len(absent)} of the {len(CATEGORIES)} categories, and the "
                      f"sets, rows and columns of {', '.join(SHORT_NAMES[c] for c in absent)} stay empty",
                      DataWarning, stacklevel=2)


def grouping_rule(d) -> str:
    """The grouping of `d` (a DataSpec) in words, for summary.json."""
    if d.group_by == "text":
        return "identical instruction text"
    return f"near-duplicate instructions (word Jaccard >= {d.group_threshold}, numbers alike, chained)"


def group_records(cfg: ExperimentConfig, records) -> list[str]:
    """The group ids of `records` under `data.group_by` (`sparcom_jax.data.splits.group_ids`)."""
    from sparcom_jax.data.splits import group_ids

    return group_ids(records, cfg.data.group_by, cfg.data.group_threshold)


def _part(cfg: ExperimentConfig, name: str) -> list:
    parts, _ = record_parts(cfg)
    if name not in parts:
        raise ConfigError(f"data.split {dict(cfg.data.split)} has no {name!r} part; add one "
                          f"(e.g. data.split={{train: 0.5, identify: 0.3, ablate: 0.2}})")
    if cfg.data.split is not None:
        _check_part_categories(cfg, parts, name)
    return parts[name]


def _check_part_categories(cfg: ExperimentConfig, parts: dict[str, list], name: str) -> None:
    """Refuse a split whose part `name` has no record of a category the records have.

    Groups of near-duplicates are dealt to the parts whole, so a small or heavily templated
    category can land in one part entirely; the stage using the other part would then count
    or evaluate nothing of it (a causal check over no held-out record, or no counts at all).

    Raises:
      ConfigError: naming the part, the categories, their records and groups, and the fixes.
    """
    from sparcom_jax.categories import CATEGORIES
    from sparcom_jax.data.records import find_duplicates

    every = [r for part in parts.values() for r in part]
    there = {r.category for r in parts[name]}
    missing = [c for c in CATEGORIES if c not in there and any(r.category == c for r in every)]
    if not missing:
        return
    groups = dict(zip((r.id for r in every), group_records(cfg, every)))
    crossed = {every[i].id for g in find_duplicates(every)[1] for i in g}
    said = []
    for c in missing:
        recs = [r for r in every if r.category == c]
        where = ", ".join(f"{p} {sum(r.category == c for r in part)}" for p, part in parts.items())
        linked = sum(r.id in crossed for r in recs)
        follow = (f", {linked} of them with an instruction text under another category too, in that text's part"
                  if linked else "")
        said.append(f"{c}: {len(recs)} record(s) in {len({groups[r.id] for r in recs})} group(s) ({where}){follow}")
    less = "" if cfg.data.group_by == "text" else ", or group less (a higher data.group_threshold, or data.group_by: text)"
    raise ConfigError(
        f"{cfg.data.path or 'the shipped set'}: data.split {dict(cfg.data.split)} leaves the {name!r} part "
        f"without a record of {len(missing)} categor{'y' if len(missing) == 1 else 'ies'} (records go to the "
        f"parts in whole groups of {grouping_rule(cfg.data)}): {'; '.join(said)}. Add records of "
        f"{'that category' if len(missing) == 1 else 'those categories'}, {'' if less else 'or '}give {name!r} a larger share{less}")


def identify_records(cfg: ExperimentConfig) -> list:
    """The records counted and identified on: the "identify" part, sampled to
    data.n_per_category per category (seed data.seed)."""
    from sparcom_jax.data import sample_balanced

    recs = _part(cfg, "identify")
    n = cfg.data.n_per_category
    if n is None:
        return recs
    try:
        return sample_balanced(recs, n, seed=cfg.data.seed)
    except ValueError as e:
        short = str(e).split("; lower n_per_category")[0]  # its advice is restated for the config below
        raise ConfigError(f"data.n_per_category={n}: the identify part of data.split has too few records "
                          f"({short}); lower n_per_category (null takes the whole part) or give identify a "
                          "larger share") from None


def ablate_records(cfg: ExperimentConfig) -> list:
    """The causal check's evaluation records: the "ablate" part, at most
    ablation.max_records per category (seed data.seed + 1)."""
    from sparcom_jax.data import count_by_category, sample_balanced

    recs = _part(cfg, "ablate")
    m = cfg.ablation.max_records
    if m is None:
        return recs
    n = min([m, *count_by_category(recs).values()])
    return sample_balanced(recs, n, seed=cfg.data.seed + 1)


def own_train_files(cfg: ExperimentConfig) -> bool:
    """Whether train_data reads files of its own (not the files of data, whose train part it samples)."""
    t, d = cfg.train_data, cfg.data
    return t is not None and (t.path, t.adapter, t.fields) != (d.path, d.adapter, d.fields)


def train_records(cfg: ExperimentConfig) -> list:
    """The fine-tuning records: the "train" part of data.split (sampled to
    train_data.n_per_category when train_data reads the same files as data), or the
    records of train_data's own files, checked disjoint from the identify and ablate
    parts by instruction text and (`data.group_by: near`) near-duplicates."""
    from sparcom_jax.data import sample_balanced
    from sparcom_jax.data.splits import group_key, group_keys

    t = cfg.train_data
    if not own_train_files(cfg):
        recs = _part(cfg, "train")
    else:
        recs = _load(t)
        parts, _ = record_parts(cfg)
        held = [r for name in ("identify", "ablate") for r in parts[name]]
        # Identical text in any category, and (group_by: near) a near-duplicate of one category.
        keys = group_keys(held + list(recs), cfg.data.group_by, cfg.data.group_threshold)
        held_keys = {group_key(r) for r in held} | set(keys[:len(held)])
        shared = [r.id for r, k in zip(recs, keys[len(held):]) if group_key(r) in held_keys or k in held_keys]
        if shared and cfg.data.split is not None:
            raise ConfigError(
                f"train_data shares {len(shared)} instruction(s) (or near-duplicates, data.group_by) with the "
                f"records analysed (e.g. {', '.join(shared[:3])}); fine-tuning and identification records must be disjoint: remove "
                "them from train_data, or set data.split=null to allow it")
    if t is not None and t.n_per_category:
        try:
            recs = sample_balanced(recs, t.n_per_category, seed=t.seed)
        except ValueError as e:
            raise ConfigError(f"train_data.n_per_category={t.n_per_category}: {e}") from None
    return recs
