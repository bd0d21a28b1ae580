"""The stages: finetune, collect, identify, evaluate, compare, ablate, report (and `run_all`).

What every stage takes, writes and returns: `sparcom_jax.pipeline` (keys of the result
starting with "_" carry in-memory results to later stages). When finished work is
reused, and what a stage does when it is not: `sparcom_jax.pipeline.provenance`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple, Sequence

from sparcom_jax.config import ConfigError, ExperimentConfig, ModelSpec
from sparcom_jax.data import content_caps as record_content_caps, encode_records, resolve_tokenizer, sample_balanced
from sparcom_jax.errors import StaleResultError
from sparcom_jax.fileio import LOCK_NAME, DirLock, atomic_dir, prepare_out_dir, remove_path, write_json
from sparcom_jax.fingerprint import (
    FINGERPRINT_FILE, MODEL_COMPUTE, TRAINING, changed_records, digest, digest_arrays, environment,
    parts_line, read_fingerprint, record_digests, served_by, with_environment, with_method, write_fingerprint,
)
from sparcom_jax.pipeline.common import (
    ablate_records, barrier, check_model_dirs, check_shared, counts_root, group_records, identify_records, is_primary,
    load_spec_model, log, log_stale_lock, make_mesh, model_list, own_train_files, primary_writes, record_parts,
    require_models, require_tokenizers, safe, save_resolved, stages_run, template_for, timed, train_records,
)
from sparcom_jax.pipeline.provenance import (
    HELD_OUT_TOKENS_UNKNOWN, READ_ONLY, collect_fingerprint, held_out_fingerprint, note_environment, note_mixed,
    output_parts, spec_model_fingerprint, spec_tokenizer, stale, token_changes,
)

# --------------------------------------------------------------------------- #
# finetune
# --------------------------------------------------------------------------- #

# Training settings that change neither the weights nor which checkpoints exist.
_TRAIN_NOT_IN_FINGERPRINT = ("log_every", "eval_batch_size", "async_checkpointing", "mesh_data", "mesh_model",
                             "allow_cut_responses")


def train_config(cfg: ExperimentConfig):
    """The training TrainConfig of `cfg.train`, with the mesh axes of `cfg.mesh`."""
    return dataclasses.replace(cfg.train, mesh_data=cfg.mesh.data, mesh_model=cfg.mesh.model)


def train_encoding(tcfg, records, tokenizer):
    """The `EncodedSet` of the fine-tuning records whose tokens a run's fingerprint holds."""
    return encode_records(records, tokenizer, template=tcfg.template, scope="response", max_length=tcfg.max_length)


def train_fingerprint(base: str, tcfg, records, tokenizer, *, enc=None) -> dict[str, Any]:
    """Fingerprint of a fine-tuning run: base model digest, settings, records and their tokens
    (`enc`: their `train_encoding` when the caller has it)."""
    enc = enc if enc is not None else train_encoding(tcfg, records, tokenizer)
    settings = {k: v for k, v in tcfg.to_dict().items() if k not in _TRAIN_NOT_IN_FINGERPRINT}
    return with_method({"base": base, "train": settings, "records": digest(enc.record_ids),
                        "tokens": digest_arrays(enc.ids, enc.scopes)})


def base_train_fingerprint(cfg: ExperimentConfig, records, tokenizer) -> tuple[dict[str, Any], Any]:
    """(`train_fingerprint`, `train_encoding`) of the config's fine-tuning run of its base model
    on `records` (its `train_records`), tokenized by `tokenizer`."""
    tcfg = train_config(cfg)
    enc = train_encoding(tcfg, records, tokenizer)
    return train_fingerprint(spec_model_fingerprint(cfg.base), tcfg, records, tokenizer, enc=enc), enc


def _run_token_changes(run_dir: Path, stored: dict | None, current: dict[str, Any], enc) -> dict[str, str | None]:
    """`stale`'s details of a fine-tuning run's "tokens": the records whose tokens differ from
    those its fingerprint.json keeps (in record order: comparable when the records are the same).
    Called only on a refusal (`stale` calls its details lazily): the file's digests are read then."""
    if not stored or stored.get("records") != current["records"]:
        return {}
    whole = read_fingerprint(run_dir, whole=True) or {}
    return token_changes({"ids": enc.record_ids, "token_digests": whole.get("token_digests")}, enc)


def check_checkpoints_current(cfg: ExperimentConfig, out: Path) -> None:
    """Refuse the fine-tuned checkpoints in OUT/checkpoints when the `finetune` run that made
    them had another fingerprint than the current config gives (base model, train settings,
    records or their tokens): the stages would analyse a model not tuned as the config says,
    and save that config as OUT/config.yaml. Nothing to check when the config names its
    fine-tuned model, or no fine-tuning finished in OUT. Checkpoints made under other package
    versions are used as they are: counting fixed weights afresh mixes no two environments (the
    report records the run's in summary.json's "environment_changes", `input_environments`).

    Raises:
      StaleResultError: naming what differs; the stages after finetune cannot recompute it.
    """
    if cfg.finetuned is not None or not (out / "checkpoints" / "series.json").is_file():
        return
    stored = read_fingerprint(out / "train")
    if stored is None:  # exports whose run directory was removed: finetune itself refuses them
        return
    current, enc = base_train_fingerprint(cfg, train_records(cfg), spec_tokenizer(cfg.base))
    stale(out / "checkpoints", stored, current, overwrite=False,
          fix="run `sparcom finetune --overwrite` first (it tunes and exports them again), or restore the "
              "settings they were tuned with",
          details=lambda: _run_token_changes(out / "train", stored, current, enc))


def guard_dir(directory: Path, stage: str, components: dict[str, Any], *, overwrite: bool,
              extra: Sequence[Path] = (), encoded=None) -> None:
    """Make `directory` safe to (re)use for work with fingerprint `components`.

    A directory with the same fingerprint is kept (its work resumes or is reused); one
    with another fingerprint, or with files but no fingerprint, stops the run (or with
    `overwrite` is removed, with `extra` paths that derive from it). The fingerprint is
    then written before any work, so an interrupted run is checked when resumed; with
    the digest of each record's tokens of `encoded` (the `EncodedSet` of its "tokens"),
    so that a refusal names the records that changed. Work that is kept keeps the environments
    it was made under in the fingerprint, with this one's from the step a resumed run goes on
    from (`resumed_environments`).
    """
    stored = read_fingerprint(directory)
    has_files = directory.is_dir() and any(p.name != LOCK_NAME for p in directory.iterdir())
    details = (lambda: _run_token_changes(directory, stored, components, encoded)) if encoded is not None else None
    clear = (stored is not None or has_files) and stale(directory, stored, components, overwrite=overwrite,
                                                        details=details)
    kept_env = None  # (this process's, from the start)
    if stored is not None and not clear and any(p.name not in (LOCK_NAME, FINGERPRINT_FILE)
                                                for p in directory.iterdir()):
        kept_env = resumed_environments(stage, directory)
    with primary_writes(f"{stage}: removing {directory}") as writes:
        # one remover: processes removing one tree at once fail on each other's deletions
        for p in (directory, *extra) if clear and writes else ():
            remove_path(p)
    barrier("sparcom:guard-dir-cleared")
    with primary_writes(f"{stage}: writing {directory / FINGERPRINT_FILE}") as writes:
        if writes:
            directory.mkdir(parents=True, exist_ok=True)
            write_fingerprint(directory, stage, components,
                              record_digests(encoded.ids, encoded.scopes) if encoded is not None else None,
                              made_under=None if kept_env is None else kept_env.get("environment", {}),
                              environments=(kept_env or {}).get("environments"))


def run_progress(run_dir: Path) -> tuple[int, int | None]:
    """(steps done: the last checkpoint's, the run's total steps; None before run.json is written)
    of a fine-tuning run directory."""
    from sparcom_jax.train import checkpoint_steps, read_run

    total = None
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        total = int(read_run(run_dir)["total_steps"])
    return max(checkpoint_steps(run_dir), default=0), total


def train_parts(run_dir: Path) -> list[dict[str, Any]]:
    """`output_parts` of a fine-tuning run (steps numbered from 1)."""
    return output_parts(read_fingerprint(run_dir, whole=True), run_progress(run_dir)[1], first=1)


def resumed_environments(stage: str, run_dir: Path) -> dict[str, Any]:
    """The environment record ({"environment", "environments"}: `with_environment`) a kept
    fine-tuning run's fingerprint.json goes on with: its own, and, when the run resumes
    (checkpoints short of its total steps), this process's making the steps after its last
    checkpoint. A resumed run's new steps continue the old ones, so a change of `TRAINING`'s
    values is said (`note_environment`); a finished run reused as it is records nothing new."""
    whole = read_fingerprint(run_dir, whole=True) or {}
    kept = {k: whole[k] for k in ("environment", "environments") if k in whole}
    done, total = run_progress(run_dir)
    resumes = total is None or done < total
    note_environment(stage, run_dir, output_parts(kept, total, first=1), fields=TRAINING if resumes else READ_ONLY)
    return (with_environment(kept, environment(), done, "step") if resumes else None) or kept


def _shared_json(path: Path, obj: Any) -> str:
    """Write an output every process computed alike: process 0 writes it, every process gets its path."""
    with primary_writes(f"writing {path}") as writes:
        if writes:
            write_json(path, obj)
    return str(path)


def export_checkpoints(run_dir: Path, ck_dir: Path, names: Callable[[int, int], str | None],
                       tokenizer=None) -> list[dict[str, Any]]:
    """Export a training run's checkpoints as <ck_dir>/<name>/hf (skipping ones already exported).

    Args:
      run_dir: the `finetune` run directory.
      ck_dir: where the exports go.
      names: (step, final_step) -> checkpoint name, or None to skip that step.

    Returns:
      [{"name", "step", "path"}] in step order (the series.json format).
    """
    from sparcom_jax.train import checkpoint_steps, export_hf, read_run

    run = read_run(run_dir)
    final = int(run["total_steps"])
    items = []
    with primary_writes(f"exporting the checkpoints of {run_dir} to {ck_dir}") as writes:
        for step in checkpoint_steps(run_dir):
            name = names(step, final)
            if name is None:
                continue
            dest = ck_dir / name / "hf"
            mark, want = ck_dir / name / "export.json", {"run": digest(run), "step": step}
            if writes:
                done = mark.is_file() and json.loads(mark.read_text()) == want and (dest / "config.json").is_file()
                if not done:
                    log(f"exporting step {step} of {run_dir} to {dest}")
                    export_hf(run_dir, step, dest, tokenizer=tokenizer)
                    write_json(mark, want)
            items.append({"name": name, "step": step, "path": str(dest)})
    return items


def finetune_stage(cfg: ExperimentConfig, out: Path, *, progress: bool = True, overwrite: bool = False
                   ) -> dict[str, Any]:
    """Instruction-fine-tune the base model on the train part; export every saved checkpoint.

    Writes OUT/train (orbax checkpoints, metrics.jsonl, fingerprint.json),
    OUT/checkpoints/<name>/hf (intermediate "<name>-step<k>" and the final "<name>")
    and OUT/checkpoints/series.json.
    """
    from sparcom_jax import train as T

    require_models([cfg.base])
    records = train_records(cfg)
    tcfg = train_config(cfg)
    name = cfg.finetuned.label if cfg.finetuned else f"{cfg.base.label}-ft"
    # The tokens fingerprinted are those trained on: one tokenizer for both.
    tok = spec_tokenizer(cfg.base)
    fp, enc = base_train_fingerprint(cfg, records, tok)
    if not tcfg.allow_cut_responses:  # refused before the run directory is written (allowed: finetune warns)
        T.check_responses_cut(enc, records, tok, tcfg)
    guard_dir(out / "train", "finetune", fp, overwrite=overwrite, extra=[out / "checkpoints"], encoded=enc)
    mesh = make_mesh(cfg.mesh)
    with timed(f"finetune: loading {cfg.base.label}"):
        model = load_spec_model(cfg.base, dtype="float32", mesh=mesh)
    held_out = ablate_records(cfg) if cfg.data.split is not None else records
    eval_records = sample_balanced(held_out, 2, seed=cfg.seed) if len(held_out) >= 12 else None
    steps = f"{tcfg.total_steps} steps" if tcfg.total_steps else f"{tcfg.epochs} epoch(s)"
    with timed(f"finetune: {cfg.base.label} -> {name}, {steps} on {len(records)} records"):
        T.finetune(model, records, tok, tcfg, out / "train", mesh=mesh, eval_records=eval_records,
                   progress=progress)
    items = export_checkpoints(
        out / "train", out / "checkpoints",
        lambda s, f: T.series_name(s, f, before=None, after=name, middle=f"{name}-step{{step}}"), tok)
    _shared_json(out / "checkpoints" / "series.json", items)
    return {"checkpoints": str(out / "checkpoints"), **{d["name"]: d["path"] for d in items}}


# --------------------------------------------------------------------------- #
# collect and the analyses built on the counts
# --------------------------------------------------------------------------- #

class CountJob(NamedTuple):
    """One model counted under one template and precision; `label` names its store.

    `control` is None for the models of the study, else the control it serves:
    "same_template" or "precision:<variant>".
    """

    spec: ModelSpec
    template: str
    label: str
    dtype: str
    gate_dtype: str | None = None
    control: str | None = None


# The precisions of the precision check: name -> (compute dtype, gate dtype).
PRECISIONS = {"float32": ("float32", None), "bfloat16": ("bfloat16", None),
              "bfloat16 with float32 gate and weights": ("bfloat16", "float32")}


def count_jobs(cfg: ExperimentConfig, out: Path) -> list[CountJob]:
    """Every model under its own template; when the tuned model's template differs from the
    base model's, the tuned model under the base model's template (the same-template
    control, "<tuned> under <template> template"); with collect.precision_check, the last
    model in every other precision ("<model> in <precision>")."""
    return jobs_of(cfg, model_list(cfg, out))


def jobs_of(cfg: ExperimentConfig, specs: list[ModelSpec]) -> list[CountJob]:
    """`count_jobs` of the models `specs` (base first, the tuned model last)."""
    c = cfg.collect
    jobs = study_jobs(cfg, specs)
    last = jobs[-1]
    if c.template_control and len(specs) > 1 and last.template != jobs[0].template:
        t = jobs[0].template
        jobs.append(CountJob(last.spec, t, f"{last.label} under {t} template", c.dtype, c.gate_dtype,
                             "same_template"))
    if c.precision_check:
        main = main_precision(cfg)
        for name, (dtype, gate) in PRECISIONS.items():
            if name != main:
                jobs.append(CountJob(last.spec, last.template, f"{last.label} in {name}", dtype, gate,
                                     f"precision:{name}"))
    return jobs


def study_jobs(cfg: ExperimentConfig, specs: list[ModelSpec]) -> list[CountJob]:
    """The models of the study, each under its own template, in collect's dtype and gate dtype."""
    return [CountJob(s, template_for(s, cfg), s.label, cfg.collect.dtype, cfg.collect.gate_dtype) for s in specs]


def main_precision(cfg: ExperimentConfig) -> str:
    """The name (in PRECISIONS) of the precision the study's counts are collected in."""
    c = cfg.collect
    return next(n for n, (d, g) in PRECISIONS.items() if d == c.dtype and (d == "float32" or g == c.gate_dtype))


def study_content_caps(cfg: ExperimentConfig, out: Path) -> dict[str, int] | None:
    """{record id: K_r}: with data.scope "content", the content tokens every count job of the
    study counts of each record (None under other scopes).

    K_r is the fewest content tokens of the record that survive data.max_length under any
    (tokenizer, template) of `count_jobs` (a longer template header keeps fewer), so
    every model and template, the same-template control included, counts the same
    content tokens. The caps come from the whole study, whichever models one call
    collects; they need the tokenizers only, not the weights.
    """
    if cfg.data.scope != "content":
        return None
    pairs: dict[Any, tuple[Any, str]] = {}
    for job in count_jobs(cfg, out):
        tok = spec_tokenizer(job.spec)
        # Series checkpoints share one tokenizer in separate directories: encode it once.
        backend = getattr(tok, "backend_tokenizer", None)
        key = (job.template, digest([backend.to_str() if backend is not None else job.spec.path,
                                     getattr(tok, "chat_template", None), tok.bos_token_id, tok.eos_token_id]))
        pairs.setdefault(key, (tok, job.template))
    return record_content_caps(identify_records(cfg), pairs.values(), max_length=cfg.data.max_length)


_CUT_KEYS = ("records", "tokens", "max_tokens", "capped_records", "capped_tokens")  # content_cut_summary's


def _log_content_cut(label: str, meta: dict, n: int, max_length) -> None:
    """Log how much instruction/input text data.max_length cut from the counted records, over every
    process's share (`meta`: this process's store's, `n`: its records). Every process takes part.

    Each process's summary is of its share alone: "X of N records" from it gave X and N of one
    share (about 1/P of the run's), and each host's log said something else.
    """
    from sparcom_jax.parallel.processes import gather
    from sparcom_jax.stats.collect import merge_meta

    mine = (meta or {}).get("content_cut")
    every = gather([n, mine is not None, *(int(mine[k]) if mine else 0 for k in _CUT_KEYS)])
    n = int(every[:, 0].sum())
    # None unless every share has its summary (a store from before the summary was kept has none).
    cut = merge_meta([{"content_cut": dict(zip(_CUT_KEYS, row[2:].tolist())) if row[1] else None}
                      for row in every])["content_cut"] if every[:, 1].all() else None
    if cut and cut["records"]:
        capped = (f"; {cut['capped_records']} of these records lost {cut['capped_tokens']} of them only to count "
                  "the same content tokens as the study's other models and templates" if cut["capped_records"] else "")
        log(f"collect {label}: {cut['records']} of {n} records have instruction/input tokens that are not counted "
            f"({cut['tokens']} tokens, at most {cut['max_tokens']} of one record), cut by data.max_length="
            f"{max_length}{capped}. Raise data.max_length to count every record whole")


def _process_share(records):
    import jax

    if jax.process_count() > 1:  # each process counts its share; stores are per process
        return records[jax.process_index()::jax.process_count()]
    return records


def collect_stage(cfg: ExperimentConfig, out: Path, *, progress: bool = True, overwrite: bool = False,
                  models: Sequence[ModelSpec] | None = None) -> dict[str, Any]:
    """Count neuron activations and expert routing of every model on the identify records.

    Stores go to `collect.store` or OUT/counts/<label>. A complete store made with the
    same fingerprint is kept, a partial one resumed; one made with other settings
    stops the run unless `overwrite`, or unless it holds no counts (stopped before its
    first chunk: it is made again).
    """
    import jax

    from sparcom_jax.parallel.processes import check_same, gather, raise_together
    from sparcom_jax.stats.collect import collect_instructions
    from sparcom_jax.stats.store import (
        STORE_VERSION, check_version, holds_work, is_complete, read_header, rows_done,
    )

    jobs = count_jobs(cfg, out) if models is None else study_jobs(cfg, models)
    require_models([j.spec for j in jobs])
    caps = study_content_caps(cfg, out)
    every = identify_records(cfg)
    # Each process takes its share of the records it read itself: they must be the same records.
    check_same(digest([[r.id, r.category, r.source, r.instruction, r.input, r.output] for r in every]),
               "the records (data.path as each host reads it)", "give every host the same data files")
    # Near-duplicate groups are found over all records counted, not over one process's share.
    records, groups = _process_share(every), _process_share(group_records(cfg, every))
    mesh = make_mesh(cfg.mesh)
    root = counts_root(cfg, out)
    written = {}
    for i, job in enumerate(jobs, 1):
        dest = root / safe(job.label)
        written[job.label] = str(dest)
        with primary_writes(f"collect {job.label}: clearing {dest}") as writes:
            if writes:
                _clear_other_layout(dest, jax.process_count())
        mine = dest / f"process_{jax.process_index()}" if jax.process_count() > 1 else dest
        fp, enc = collect_fingerprint(cfg, job.spec, records, job.template, dtype=job.dtype,
                                      gate_dtype=job.gate_dtype, content_caps=caps)
        check_same(fp["model"], f"collect {job.label}: the model files",
                   "give every host the same model files")
        header, error, done, resume = read_header(mine), None, False, False
        if header is not None and not holds_work(mine):  # stopped before its first chunk: nothing to keep
            log(f"collect [{i}/{len(jobs)}] {job.label}: an earlier collection into {dest} stopped before it "
                "finished a chunk (no record counted); counting from the start")
            header = None  # the store resumes from row 0 with the same settings, or is made again with others
        try:
            if header is not None and not overwrite:  # a store of another format is never resumed or reused
                check_version(header, mine, "re-run with --overwrite to count again, or choose another --out")
            # A store with the activation sums serves a run without them (`served_by`): reused or finished as made.
            served = served_by(fp, header and header.get("fingerprint"))
            resume = header is not None and header.get("version") == STORE_VERSION and not stale(
                mine, header.get("fingerprint"), served, overwrite=overwrite,
                details=lambda: token_changes(header, enc))
            fp = served if resume else fp
            # Group keys are not in the fingerprint (stores written before they were kept still match), but
            # the analysis refuses keys that are not the records' and asks for --overwrite: that recounts.
            if resume and header.get("groups") is not None:
                resume = not stale(mine, {"groups": digest(header["groups"])}, {"groups": digest(groups)},
                                   overwrite=overwrite)
            done = resume and is_complete(mine)
        except StaleResultError as e:
            error = e
        # Decided by all processes together: each collection is one program over all of them.
        raise_together(error, f"collect {job.label}")
        if resume:  # its counts so far are kept: made under which versions? (they matter beside new chunks)
            note_environment("collect", mine, store_parts(header), fields=READ_ONLY if done else MODEL_COMPUTE)
        # Whether the sums are counted chooses the program every process runs: one choice for all
        # (the config is the same on every process, `run_key`: only the stores' may differ).
        sums = cfg.collect.sums or bool(gather(fp["sums"]).any())
        if gather(done).all():
            log(f"collect [{i}/{len(jobs)}] {job.label}: already complete with the same settings in {dest}")
            _log_content_cut(job.label, header.get("meta"), len(records), cfg.data.max_length)
            continue
        if resume and not done:
            log(f"collect [{i}/{len(jobs)}] {job.label}: an earlier collection into {dest} stopped before it "
                f"finished ({rows_done(mine)} of {header['n']} records counted); resuming it with the same settings")
        with timed(f"collect [{i}/{len(jobs)}] {job.label}: {len(records)} instructions, "
                   f"template {job.template}, scope {cfg.data.scope}, {job.dtype}"):
            model = load_spec_model(job.spec, dtype=job.dtype, mesh=mesh, moe_impl=cfg.collect.moe_impl,
                                    gate_dtype=job.gate_dtype)
            counts = collect_instructions(model, records, resolve_tokenizer(model), template=job.template,
                                          scope=cfg.data.scope, batch_size=cfg.collect.batch_size,
                                          max_length=cfg.data.max_length, out=dest, mesh=mesh, progress=progress,
                                          buckets=cfg.collect.buckets, sums=sums, fingerprint={**fp, "sums": sums},
                                          overwrite=overwrite, content_caps=caps, groups=groups)
            c = counts.meta["compilations"]
            log(f"collect {job.label}: {counts.meta['tokens_per_s']:,.0f} tok/s, {c['compilations']} compilation(s), "
                f"{c['cache_hits']} loaded from the cache ({c['compile_seconds']:.1f} s)")
            _log_content_cut(job.label, counts.meta, len(records), cfg.data.max_length)
            del model
    return written


def _clear_other_layout(dest: Path, processes: int) -> None:
    """Remove what a collection with another number of processes left in a model's count directory.

    The directory holds one store (one process) or the stores process_0 .. process_<P-1>
    (P processes, each counting its `_process_share`). Another run's layout can be
    neither resumed nor merged with this one's (its shares are other records), and left
    beside it, it is what the analysis would read; so the current layout replaces it.
    Every process of a collection opens its store before any counting, so a run of P
    processes leaves exactly process_0 .. process_<P-1>: any other set of them was left by
    another number of processes (its process_0 holds another share), or by one stopped
    before all its stores were opened (nothing counted).
    """
    if not dest.is_dir():
        return
    ours = {f"process_{k}" for k in range(processes)} if processes > 1 else set()
    left = {p.name for p in dest.iterdir() if p.name.startswith("process_")}
    for p in sorted(dest.iterdir()):
        part = p.name.startswith("process_")
        other = (not part or left != ours) if processes > 1 else part
        if other and not p.name.startswith("."):  # hidden: the store's lock, another process's temporary files
            log(f"{dest}: removing {p.name}, left by a collection with another number of processes")
            remove_path(p)


def open_model_counts(cfg: ExperimentConfig, out: Path, spec: ModelSpec, template: str | None = None,
                      label: str | None = None, dtype: str | None = None, gate_dtype: str | None = None,
                      content_caps: dict[str, int] | None = None):
    """The counts of one model (merging per-process stores of a multi-host run), after checking
    that they were collected with the current settings (`content_caps`: the study's,
    computed when not given).

    Raises:
      StaleResultError: the stored counts were made with other inputs or settings, or their
        group keys are not the records'.
      ValueError: there are no (complete) counts.
    """
    from sparcom_jax.stats.counts import Counts
    from sparcom_jax.stats.store import open_counts, read_header

    label = label or spec.label
    template = template or template_for(spec, cfg)
    root = counts_root(cfg, out) / safe(label)
    parts = sorted(root.glob("process_*"), key=lambda p: int(p.name.split("_")[1]))
    records = identify_records(cfg)
    if parts:
        _check_every_share(root, parts, [r.id for r in records])
    caps = content_caps if content_caps is not None else study_content_caps(cfg, out)
    shares = [records[k::len(parts)] for k in range(len(parts))] if parts else [records]
    # One model digest and tokenizer for every process's store: the digest read all the weights
    # once per store when the digest cache is off or cannot be written.
    settings = dict(dtype=dtype or cfg.collect.dtype, gate_dtype=gate_dtype if dtype else cfg.collect.gate_dtype,
                    content_caps=caps, tokenizer=spec_tokenizer(spec), model_digest=spec_model_fingerprint(spec))
    for part, recs in zip(parts or [root], shares):
        header = read_header(part)
        if header is None:
            raise ConfigError(f"{part}: no counts of {label} here: this stage reads the counts `sparcom collect` "
                              "writes; run that first with the same --config and --out (or `sparcom run`, every "
                              "stage in order, reusing what is done)")
        fp, enc = collect_fingerprint(cfg, spec, recs, template, **settings)
        stale(part, header.get("fingerprint"), served_by(fp, header.get("fingerprint")), overwrite=False,
              fix="run `sparcom collect --overwrite` first, or choose another --out",
              details=lambda: token_changes(header, enc))
    # Sums the run did not ask for (a store that has them serves it, `served_by`) are left out: the
    # analysis then gets what counts collected without them give, and a merge does not copy them.
    unasked = {} if cfg.collect.sums else dict.fromkeys(Counts.SUM_FIELDS.values())
    if parts:
        counts = merge_shares([dataclasses.replace(open_counts(p), **unasked) for p in parts], root)
        # What the later stages fingerprint the counts by: that of one store of every record, which the
        # merged counts equal (each share was checked against its own above). Results made from counts
        # of one process count stay valid for those of another, and change with whatever changes counts.
        whole, _ = collect_fingerprint(cfg, spec, records, template, **settings)
        whole = served_by(whole, header.get("fingerprint"))  # the shares were counted together, alike
        counts = dataclasses.replace(counts, meta={**counts.meta, "fingerprint": whole})
    else:
        counts = dataclasses.replace(open_counts(root), **unasked)
    # The analysis draws near-duplicate records together: their group keys must be the records' under
    # data.group_by. A store written before keys were kept gets them here (its records were checked
    # above); keys that differ mean text changed beyond the counted tokens (cut by max_length).
    groups = group_records(cfg, records)
    if counts.groups is None:
        counts = dataclasses.replace(counts, groups=groups)
    elif list(counts.groups) != groups:
        raise StaleResultError(
            f"{root}: the count store's group keys (which records are near-duplicates) differ from the "
            f"current records' under data.group_by={cfg.data.group_by!r} "
            f"({sum(a != b for a, b in zip(counts.groups, groups))} records): their instruction text, or the "
            "grouping rule, changed where no counted token did; run `sparcom collect --overwrite` first, or "
            "choose another --out")
    return counts


def _check_every_share(root: Path, parts: Sequence[Path], ids: Sequence[str]) -> None:
    """Refuse process stores that are not the whole of one collection (a copy of OUT without
    one of them): taken for the stores of fewer processes, each was refused as made from other
    records. Process 0 holds records 0, P, 2P, ... of a P-process collection, so its ids tell P.

    Raises:
      ConfigError: naming the missing stores.
    """
    from sparcom_jax.stats.store import read_header

    have = {int(p.name.split("_")[1]) for p in parts}
    first = ((read_header(parts[0]) or {}).get("ids") or []) if 0 in have else []
    step = ids.index(first[1]) if len(first) > 1 and first[1] in ids else 0
    made_by = step if step and list(first) == list(ids[::step]) else 0  # (records changed: the stores say)
    total = max(max(have) + 1, made_by)
    missing = sorted(set(range(total)) - have)
    if missing:
        raise ConfigError(
            f"{root}: the count stores of a {total}-process collection are not all here "
            f"({', '.join(f'process_{k}' for k in missing)} {'is' if len(missing) == 1 else 'are'} missing); copy "
            "every process_<k> directory of it, or run `sparcom collect` again (it counts them anew)")


def merge_shares(cs, root):
    """The counts of every process's `_process_share` (process k counted records k, k+P, ...)
    as one `Counts`, its rows back in the records' order: a multi-process run then hands
    the analysis (its bootstrap and permutation draws over rows) what one process would."""
    import numpy as np

    from sparcom_jax.stats.collect import merge_meta
    from sparcom_jax.stats.counts import Counts

    n, p = sum(c.n for c in cs), len(cs)
    # The record behind each row of the process stores laid end to end, and the rows that put them in order.
    order = np.argsort(np.concatenate([np.arange(k, n, p) for k in range(p)]), kind="stable")
    merged = {}
    for key in ("tokens", *cs[0].arrays(), *cs[0].sums()):
        # Each share is read (from its store, when lazy) straight into its rows k, k+P, ...: the merged
        # array is the one copy. Concatenating and then reordering held three (every process merges).
        parts = [getattr(c, key) for c in cs]
        merged[key] = np.empty((n, *parts[0].shape[1:]), parts[0].dtype)
        for k, part in enumerate(parts):
            merged[key][k::p] = part[:]
    # A label some share lacks is left out (a store resumed from before group keys were kept has none;
    # open_model_counts then takes them from the records).
    labels = {k: None if any(getattr(c, k) is None for c in cs) else [x for c in cs for x in getattr(c, k)]
              for k in ("ids", "categories", "sources", "groups")}
    return Counts(**{k: v and [v[i] for i in order] for k, v in labels.items()},
                  meta=dict(merge_meta([c.meta for c in cs]), store=str(root),
                            fingerprint={f"process_{k}": c.meta.get("fingerprint") for k, c in enumerate(cs)}),
                  **merged)


def _analysis_kwargs(cfg: ExperimentConfig, full: bool, draws: bool = False) -> dict[str, Any]:
    return dict(seed=cfg.seed, **cfg.identify.analysis_options(full, draws))


class Analyses(NamedTuple):
    """The analysed models in series order, and the controls ({"same_template": analysis,
    "precision:<name>": analysis})."""

    models: dict[str, Any]
    controls: dict[str, Any]


def analyze_all(cfg: ExperimentConfig, out: Path, *, full: bool = True) -> Analyses:
    """ModelAnalysis of every model with counts (and of the controls). The same-template control
    is bootstrapped with the models' draws (sets only), so its comparison and the template effect
    get paired intervals (`same_template_control`), and gets its instruction-level overlap (its
    diagonal dominance)."""
    from sparcom_jax.analysis import analyze_model

    icfg = cfg.identify.to_rule()
    models, controls = {}, {}
    jobs = count_jobs(cfg, out)
    caps = study_content_caps(cfg, out)
    for i, job in enumerate(jobs, 1):
        with timed(f"analyse [{i}/{len(jobs)}] {job.label}"):
            counts = open_model_counts(cfg, out, job.spec, job.template, job.label, job.dtype, job.gate_dtype,
                                       content_caps=caps)
            kw = _analysis_kwargs(cfg, full and not job.control, draws=full and job.control == "same_template")
            ma = analyze_model(counts, icfg, name=job.label, **kw)
            ma.meta.update(template=job.template, precision=job.dtype, gate_dtype=job.gate_dtype)
        (controls if job.control else models)[job.control or job.label] = ma
    note_mixed("analyse", [("collect", ma.meta.get("store") or ma.name, counts_parts(ma.meta))
                           for ma in (*models.values(), *controls.values())])
    return Analyses(models, controls)


def store_parts(header: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    """`output_parts` of a count store by its meta.json `header` (chunks numbered from 0)."""
    header = header or {}
    n, rows = header.get("n"), header.get("chunk_rows")
    return output_parts(header.get("meta"), -(-n // rows) if n is not None and rows else None)


def counts_parts(meta: Mapping[str, Any]) -> list[dict[str, Any]]:
    """`store_parts` of the store counts (or their analysis) were read from, by their `meta`."""
    from sparcom_jax.stats.store import read_header

    store = meta.get("store")
    header = read_header(store) if store else None
    return store_parts(header) if header else output_parts(meta)


def _analysis_fingerprint(cfg: ExperimentConfig, an: Analyses, full: bool) -> dict[str, Any]:
    every = {**an.models, **{f"control:{k}": v for k, v in an.controls.items()}}
    out = {"identify": cfg.identify.to_rule().to_dict(), "analysis": _analysis_kwargs(cfg, full),
           "counts": {name: digest(ma.meta.get("fingerprint")) for name, ma in every.items()}}
    if full:  # the clusters the bootstrap and permutation test moved together
        out["groups"] = {name: digest(next(iter(ma.fields.values())).ident.groups) for name, ma in every.items()
                         if ma.fields}
    return with_method(out)


def _unseal(directory: Path) -> None:
    """Remove `directory`'s fingerprint.json before its outputs are rewritten: a write that
    fails or is interrupted midway leaves new files beside old ones, and the old fingerprint
    would vouch for all of them. `_seal` writes the new one when every output is written."""
    with primary_writes(f"removing {directory / FINGERPRINT_FILE}") as writes:
        if writes:
            (directory / FINGERPRINT_FILE).unlink(missing_ok=True)


def _seal(directory: Path, stage: str, written: dict[str, Any], components: dict[str, Any]) -> None:
    """Write `directory`'s fingerprint.json for the outputs `written` now, and remove the files an
    earlier run left there that this one did not write (a model or control left out since): the
    fingerprint would vouch for them. Hidden files (another process's temporary files) stay."""
    with primary_writes(f"{stage}: sealing {directory}") as writes:
        if not writes:
            return
        keep = {Path(p).name for p in written.values()} | {FINGERPRINT_FILE}
        for p in directory.iterdir() if directory.is_dir() else ():
            if p.name not in keep and not p.name.startswith("."):
                remove_path(p)
        write_fingerprint(directory, stage, components)


def identify_stage(cfg: ExperimentConfig, out: Path, *, analyses: Analyses | None = None, **_) -> dict[str, Any]:
    """Identify ISNs / ISEs of every model and export the lists (OUT/identify/<model>/)."""
    from sparcom_jax.report.export import export_sets

    analyses = analyses or analyze_all(cfg, out, full=False)
    _unseal(out / "identify")
    written = {}
    for name, ma in analyses.models.items():
        d = out / "identify" / safe(name)
        with primary_writes(f"identify: writing {d}") as writes:
            if writes:  # a section an earlier run listed here (another model of this name) must not stay
                remove_path(d)
            for fa in ma.fields.values() if writes else ():
                export_sets(d, fa.ident)
        written[name] = str(d)
    _seal(out / "identify", "identify", written, _analysis_fingerprint(cfg, analyses, False))
    return written


def evaluate_stage(cfg: ExperimentConfig, out: Path, *, analyses: Analyses | None = None, **_) -> dict[str, Any]:
    """Generality, uniqueness, overlaps and layer profiles of every model (OUT/evaluate/<model>.json)."""
    analyses = analyses or analyze_all(cfg, out, full=True)
    _unseal(out / "evaluate")
    written = {name: _shared_json(out / "evaluate" / f"{safe(name)}.json", ma.summary())
               for name, ma in analyses.models.items()}
    _seal(out / "evaluate", "evaluate", written, _analysis_fingerprint(cfg, analyses, True))
    return written


def compare_stage(cfg: ExperimentConfig, out: Path, *, analyses: Analyses | None = None, **_) -> dict[str, Any]:
    """Before/after comparison, the series along every checkpoint, and the same-template
    control (OUT/compare/)."""
    from sparcom_jax.analysis import compare_models, compare_series, same_template_control

    analyses = analyses or analyze_all(cfg, out, full=True)
    models = analyses.models
    names = list(models)
    if len(names) < 2:
        raise ConfigError("compare needs two models: set finetuned (and optionally series), "
                          "or run `sparcom finetune` first")
    comparison = compare_models(models[names[0]], models[names[-1]])
    _unseal(out / "compare")
    written = {"comparison": _shared_json(out / "compare" / "comparison.json", comparison)}
    series = compare_series([(n, models[n]) for n in names]) if len(names) > 2 else None
    if series is not None:
        written["series"] = _shared_json(out / "compare" / "series.json", series)
    controls = {}
    if "same_template" in analyses.controls:
        controls["same_template"] = same_template_control(models[names[0]], models[names[-1]],
                                                          analyses.controls["same_template"])
        written["same_template"] = _shared_json(out / "compare" / "same_template.json",
                                                controls["same_template"])
    precision = precision_agreement(cfg, analyses)
    if precision:
        written["precision"] = _shared_json(out / "compare" / "precision.json", precision)
    _seal(out / "compare", "compare", written, _analysis_fingerprint(cfg, analyses, True))
    return {**written, "_comparison": comparison, "_series": series, "_controls": controls,
            "_precision": precision}


def precision_agreement(cfg: ExperimentConfig, analyses: Analyses) -> dict[str, Any] | None:
    """How far the last model's sets in each other precision are from its float32 sets.

    Returns:
      {"<section> <precision>": {category: Jaccard of the category sets vs float32}}
      plus "reference" and "note" entries, or None without the precision check.
    """
    from sparcom_jax.analysis.common import safe_div
    from sparcom_jax.categories import CATEGORIES

    runs = {name[len("precision:"):]: ma for name, ma in analyses.controls.items() if name.startswith("precision:")}
    if not runs:
        return None
    runs[main_precision(cfg)] = list(analyses.models.values())[-1]
    ref = runs.pop("float32")
    out: dict[str, Any] = {}
    for name, ma in runs.items():
        for sec, fa in ma.fields.items():
            a = ref[sec].ident.category_sets.reshape(len(CATEGORIES), -1)
            b = fa.ident.category_sets.reshape(len(CATEGORIES), -1)
            jac = safe_div((a & b).sum(1), (a | b).sum(1))
            out[f"{sec} {name}"] = {c: (None if jac[i] != jac[i] else float(jac[i])) for i, c in enumerate(CATEGORIES)}
    out["reference"] = f"{ref.name} (float32, every product at full precision)"
    out["note"] = ("Jaccard of each category set with the float32 set of the same model on the same records; "
                   f"the study's counts are in {main_precision(cfg)}")
    return out


# --------------------------------------------------------------------------- #
# ablate
# --------------------------------------------------------------------------- #

# Ablation kind -> the analysis section whose category sets it switches off.
ABLATION_SECTIONS = {"neurons": "isn", "experts": "ise", "expert_neurons": "expert_neurons"}


def ablation_models(cfg: ExperimentConfig, out: Path) -> list[ModelSpec]:
    """The models the causal check runs on (`ablation.model`)."""
    return ablated_of(cfg, model_list(cfg, out))


def ablated_of(cfg: ExperimentConfig, specs: list[ModelSpec]) -> list[ModelSpec]:
    """`ablation_models` of the models `specs` (base first, the tuned model last)."""
    which = cfg.ablation.model
    if which == "base" or len(specs) == 1:
        return [specs[0]]
    if which == "finetuned":
        return [specs[-1]]
    return [specs[0], specs[-1]]


def _ablation_file(out: Path, label: str, kind: str) -> Path:
    return out / "ablate" / f"{safe(label)}_{kind}.json"


# The mass-matched control's rule, in the experts' fingerprint: the draws match, per layer, the
# mass the set dropped in its own pass, each layer filled without bias (`mass_fill`). Results of
# the earlier rules are refused: `True` (matched to the set's unablated estimate, which removing
# the set's early experts can move) and "measured_set_mass" (the closest prefix of a random
# order, which overshot small targets).
MASS_RULE = "measured_set_mass/unbiased_fill"
# The neurons' (and expert neurons') firing-mass-matched control, in their fingerprint with the
# categories it runs for (`ablation.neuron_mass_matched`): per layer, random units outside the set
# whose frequencies on the category's records sum on average to the set's (`mass_fill`), the records
# of `ablation.neuron_mass_source`: {source}_firing, so that results of one source are never served
# for the other (those made before the source was chosen counted the identification's).
NEURON_MASS_RULE = "{source}_firing/unbiased_fill"
# The neurons' (and expert neurons') magnitude-matched control, in their fingerprint with the categories
# it runs for (`ablation.neuron_magnitude_matched`), where it can run (`magnitude_control`): absent
# otherwise, so results made before it existed (or without it) match only settings that do not ask for it.
MAGNITUDE_RULE = "held_out_positive_activation/unbiased_fill"


def magnitude_control(a, kind: str) -> str | None:
    """Which categories the magnitude-matched control runs for under `a` (`cfg.ablation`) for `kind`:
    "always" or "where_warned"; None where it does not run: experts, no draws, "never", or without the
    held-out firing-mass-matched control (the unablated pass that counts that firing measures the
    magnitude beside it)."""
    if (kind == "experts" or not a.n_random or a.neuron_magnitude_matched == "never"
            or a.neuron_mass_matched == "never" or a.neuron_mass_source != "held_out"):
        return None
    return a.neuron_magnitude_matched


def ablation_fingerprint(cfg: ExperimentConfig, spec: ModelSpec, records, kind: str, counts_fp) -> dict[str, Any]:
    """What one causal-check result depends on, but for the tokens of its held-out records
    (`held_out_fingerprint`, which needs the tokenizer: the stage adds them)."""
    a = cfg.ablation
    return with_method({"model": spec_model_fingerprint(spec), "counts": digest(counts_fp),
            "identify": cfg.identify.to_rule().to_dict(),
            "ablation": {"kind": kind, "n_random": a.n_random, "neighbours": a.neighbours, "seed": cfg.seed,
                         "expert_mode": a.expert_mode,
                         # experts only, and absent when off: results made without it still match then
                         **({"mass_matched": MASS_RULE} if kind == "experts" and a.mass_matched else {}),
                         # neurons: absent when "never" (results made before it existed were made so)
                         **({"mass_matched": NEURON_MASS_RULE.format(source=a.neuron_mass_source)
                             + f"/{a.neuron_mass_matched}"}
                            if kind != "experts" and a.neuron_mass_matched != "never" else {}),
                         **({"magnitude_matched": f"{MAGNITUDE_RULE}/{m}"}
                            if (m := magnitude_control(a, kind)) else {})},
            # The text and category of each record, not only its id: the loss is measured on them.
            "records": digest([[r.id, r.category, r.instruction, r.input, r.output] for r in records]),
            "template": template_for(spec, cfg),
            "max_length": cfg.data.max_length, "dtype": cfg.collect.dtype,
            # absent when unused, so results made before it was fingerprinted still match
            **({"gate_dtype": cfg.collect.gate_dtype} if cfg.collect.gate_dtype else {})})


def ablate_stage(cfg: ExperimentConfig, out: Path, *, analyses: Analyses | None = None, overwrite: bool = False,
                 **_) -> dict[str, Any]:
    """Causal check: switch off each category's ISNs (ISEs, expert neurons) and measure every
    category's loss on the held-out "ablate" records.

    Writes OUT/ablate/<model>_<kind>.json (with its fingerprint); a result with the same
    fingerprint is reused. Returns the AblationResults too.
    """
    import jax

    import numpy as np

    from sparcom_jax.analysis.ablate import (ablate_identification, baseline_expert_mass, baseline_firing_magnitude,
                                             coverage_log_lines, full_layers)
    from sparcom_jax.categories import CATEGORIES, normalize_category
    from sparcom_jax.parallel.processes import check_same
    from sparcom_jax.stats.losses import encode_held_out, make_loss_fn, response_coverage

    a = cfg.ablation
    if not a.enabled:
        log("ablate: disabled (ablation.enabled=false)")
        return {}
    specs = ablation_models(cfg, out)
    require_models(specs)
    analyses = analyses or analyze_all(cfg, out, full=False)
    records = ablate_records(cfg)
    mesh = None
    written: dict[str, Any] = {"_results": {}}
    for spec in specs:
        ma = analyses.models[spec.label]
        model = None
        # The tokens fingerprinted are those the loss is measured on: encoded once, for both.
        tokenizer = spec_tokenizer(spec)
        held_enc = encode_held_out(records, tokenizer, template=template_for(spec, cfg),
                                   max_length=cfg.data.max_length)
        tokens_fp, held_out = held_out_fingerprint(cfg, spec, records, encoded=held_enc)
        for kind, section in ABLATION_SECTIONS.items():
            if kind not in a.kinds or section not in ma.fields:
                continue
            f = _ablation_file(out, spec.label, kind)
            fp = {**ablation_fingerprint(cfg, spec, records, kind, ma.meta.get("fingerprint")), **tokens_fp}
            # Each process runs a share of the passes on the model and records it read itself.
            check_same(fp, f"ablate {spec.label}: {kind}: the model files, held-out records or counts",
                       "give every host the same model and data files")
            res = _stored_ablation(f, fp, held_out, overwrite=overwrite)
            unmeasured = res is not None and _magnitude_unmeasured(res, a)
            if unmeasured and overwrite:
                res = None  # (the same passes again, the activation magnitude measured beside the firing)
            if res is not None:
                log(f"ablate {spec.label}: {kind}: reusing {f} (same settings"
                    + ("; made before the activation magnitude was kept: not measured, --overwrite measures it)"
                       if unmeasured else ")"))
                written[f"{spec.label}_{kind}"] = str(f)
                written["_results"][(spec.label, kind)] = res
                continue
            if kind == "experts" and (full := full_layers(ma[section].ident.sets())):
                # Routing would have no expert left there. Checked before any pass: an error
                # of a pass (here or another process's) must stop the run, not skip the kind.
                log(f"ablate {spec.label}: experts skipped: {full}")
                # A result an earlier run stored here belongs to other sets: left in place, the
                # report would refuse it and ask for this very run again.
                with primary_writes(f"ablate: removing {f}") as writes:
                    if writes:
                        f.unlink(missing_ok=True)
                continue
            # The counts chose the sets whose losses this run measures: their versions matter here.
            note_environment("ablate", ma.meta.get("store") or ma.name, counts_parts(ma.meta), made_by="collect",
                             fields=MODEL_COMPUTE)
            if model is None:
                # Each process runs its share of the passes alone, on its own devices (`_passes_shared`).
                mesh = make_mesh(cfg.mesh, local=True) if mesh is None else mesh
                # The counting numerics (dtype and gate dtype) chose the sets: the loss is measured in them.
                model = load_spec_model(spec, dtype=cfg.collect.dtype, mesh=mesh, moe_impl=cfg.collect.moe_impl,
                                        gate_dtype=cfg.collect.gate_dtype)
            sets = ma[section].ident.category_sets
            mass_matched = kind == "experts" and a.mass_matched and a.n_random > 0  # (no draws: no pass for it)
            # Neurons: firing-mass-matched draws, no pass of their own (one round), valued at the firing
            # counted in the baseline pass (held_out) or from the counts (identification).
            firing = (a.neuron_mass_matched if kind != "experts" and a.n_random > 0
                      and a.neuron_mass_matched != "never" else None)
            held_out_firing = firing is not None and a.neuron_mass_source == "held_out"
            magnitude = magnitude_control(a, kind)
            if magnitude is None and kind != "experts" and a.n_random and a.neuron_magnitude_matched != "never":
                log(f"ablate {spec.label}: {kind}: no magnitude-matched control (ablation.neuron_magnitude_matched: "
                    f"{a.neuron_magnitude_matched}): it needs the firing-mass-matched control on the held-out "
                    "records, which measures each unit's magnitude (ablation.neuron_mass_matched: always or "
                    "where_warned, ablation.neuron_mass_source: held_out)")
            # The baseline, then per category with a set: the set and its draws; the mass-matched
            # draws only where the category has scored held-out tokens (else no mass to match).
            scored = {normalize_category(c) for c, v in response_coverage(held_enc).items() if v["response_tokens"]}
            with_set = {c for i, c in enumerate(CATEGORIES) if sets[i].any()}
            firing_draws = a.n_random * len(with_set) if firing == "always" else 0  # (where_warned: known once drawn)
            total = 1 + len(with_set) * (1 + a.n_random) + (a.n_random * len(scored & with_set) if mass_matched else 0)
            # (magnitude-matched draws beside the firing-matched ones: where_warned is known once drawn)
            magnitude_draws = firing_draws if magnitude == "always" else 0
            total += firing_draws + magnitude_draws
            more = (f", and {a.n_random} more per category whose frequency-matched draws fire less than its set"
                    if firing == "where_warned" else "") + (
                f", and {a.n_random} more per category whose set carries more activation than its firing-matched "
                "draws" if magnitude == "where_warned" else "")
            with timed(f"ablate {spec.label}: {kind} ({total} passes over {len(records)} held-out records{more})"):
                # The collection's bucket lengths: the same padded shapes, fewer compilations.
                # (the tokenizer: for the firing's content tokens, found in `held_enc`'s sequences)
                loss_fn = make_loss_fn(model, records, tokenizer, kind=kind, template=template_for(spec, cfg),
                                       batch_size=a.batch_size, max_length=cfg.data.max_length, mesh=mesh,
                                       buckets=cfg.collect.buckets or None, expert_mode=a.expert_mode,
                                       encoded=held_enc, firing_scope=cfg.data.scope if held_out_firing else None)
                # Each call numbers its passes from 0 (process k runs k, k+P, ...); the mass pass is process 0's.
                measured = mass_matched or held_out_firing  # (the baseline pass first: it measures the masses)
                first = len(with_set) * (1 + a.n_random) + (0 if measured else 1) + firing_draws + magnitude_draws
                rounds = [1, first, total - 1 - first] if mass_matched else [1, first] if measured else [first]
                mine = sum(len(range(jax.process_index(), r, jax.process_count())) for r in rounds)
                with _Counting(loss_fn, mine, f"ablate {kind}") as fn:
                    # With a mass-matched control the baseline is the pass that measures the masses.
                    shape = np.shape(sets[0])
                    # (held-out firing: each unit's firing and, behind it, its activation magnitude)
                    base, mass = (_baseline_shared(fn, baseline_expert_mass, shape, "expert mass") if mass_matched
                                  else _baseline_shared(fn, baseline_firing_magnitude, (2, *shape), "unit firing")
                                  if held_out_firing else (None, None))
                    masses = ({"firing_mass": {c: m[0] for c, m in mass.items()},
                               "firing_magnitude": {c: m[1] for c, m in mass.items()}} if held_out_firing
                              else {"expert_mass": mass})
                    res = ablate_identification(ma[section].ident, fn, n_random=a.n_random, seed=cfg.seed,
                                                neighbours=a.neighbours, baseline=base, **masses,
                                                run=fn.counted(_passes_shared) if firing else _passes_shared,
                                                firing_matched=firing, firing_source=a.neuron_mass_source,
                                                magnitude_matched=magnitude)
            for w in coverage_log_lines(res.coverage) + res.matching_warnings():
                log(f"ablate {spec.label}: {kind}: warning: {w}")
            written[f"{spec.label}_{kind}"] = _shared_json(f, {**res.to_dict(), "fingerprint": fp,
                                                               "held_out": held_out, "environment": environment()})
            written["_results"][(spec.label, kind)] = res
        del model
    return written


def _magnitude_unmeasured(res, a) -> bool:
    """Whether a stored neuron (expert-neuron) result lacks the activation magnitude the current
    settings `a` (`cfg.ablation`) measure beside the held-out firing: made before it was kept.
    Not in the fingerprint, so such a result is still reused (shown as not measured, never as
    measured); `--overwrite` recomputes it."""
    return (res.kind != "experts" and a.neuron_mass_source == "held_out" and res.mass_random_draws is not None
            and res.mass_random_draws.shape[0] > 0 and res.set_layer_magnitude is None)


def _loss_cells(losses) -> list[float]:
    """{category: mean loss} as 2C numbers a shared pass row carries: the losses (NaN: none),
    then whether each category has one; `_loss_dict` reads them back."""
    import numpy as np

    from sparcom_jax.categories import CATEGORIES, normalize_category

    losses = {normalize_category(k): float(v) for k, v in losses.items()}
    return [losses.get(c, np.nan) for c in CATEGORIES] + [c in losses for c in CATEGORIES]


def _loss_dict(cells) -> dict[str, float]:
    """The {category: mean loss} of `_loss_cells`' 2C numbers."""
    from sparcom_jax.categories import CATEGORIES

    n = len(CATEGORIES)
    return {c: float(cells[j]) for j, c in enumerate(CATEGORIES) if cells[n + j]}


def _passes_shared(loss_fn, masks):
    """The causal check's `MaskRunner` over processes: `share_map` gives process k the passes
    k, k+P, ... of the call (each over every held-out record, on its own devices:
    `make_mesh(local=True)`) and every process every pass's losses and masses as the process
    that ran it has them, so every process draws the same second round. A pass is the same
    program on every process's devices, so the result is the one process's, in 1/P of the
    time (each call ends in the gather: a round of R passes takes ceil(R/P) passes)."""
    import numpy as np

    from sparcom_jax.analysis.ablate import category_layer_mass, category_mass, dropped_mass
    from sparcom_jax.categories import CATEGORIES
    from sparcom_jax.parallel.processes import share_map

    n = len(CATEGORIES)
    L = next((np.shape(m)[0] for m in masks if m is not None), 0)  # (one shape for all of a check's masks)

    def one(i):  # [category losses (NaN: none), category has a loss, dropped mass (NaN: none),
        # mass dropped on each category's tokens (NaN: none), the same per layer [C * L]]
        mask = masks[i]
        cells = _loss_cells(loss_fn(mask))
        by_cat, by_layer = category_mass(loss_fn) or {}, category_layer_mass(loss_fn, mask) or {}
        return np.concatenate([cells, [dropped_mass(loss_fn)], [by_cat.get(c, np.nan) for c in CATEGORIES]]
                              + [by_layer.get(c, np.full(L, np.nan)) for c in CATEGORIES])

    rows = share_map(one, len(masks), 3 * n + 1 + n * L, "ablate")

    def finite(values):
        return {c: v for c, v in zip(CATEGORIES, values) if np.isfinite(v).all()} or None

    return [(_loss_dict(r[:2 * n]), float(r[2 * n]),
             finite([float(x) for x in r[2 * n + 1:3 * n + 1]]), finite(r[3 * n + 1:].reshape(n, L)))
            for r in rows]


def _baseline_shared(loss_fn, measure, shape: tuple[int, ...], what: str) -> tuple[dict[str, float], dict[str, Any]]:
    """`measure(loss_fn)` (`baseline_expert_mass` or `baseline_firing_magnitude`: the baseline losses
    and each category's masses, float `shape`; `what` they are, for an error) run by process 0
    and given to every process bit for bit, so that every process draws the same mass-matched
    sets; it is the check's baseline too (`ablation_matrix(baseline=)`)."""
    import numpy as np

    from sparcom_jax.categories import CATEGORIES
    from sparcom_jax.parallel.processes import share_map

    C, size = len(CATEGORIES), int(np.prod(shape))

    def one(_):  # [category losses, category has a loss, every category's masses flattened (NaN: none)]
        losses, mass = measure(loss_fn)
        return np.concatenate([_loss_cells(losses)]
                              + [np.ravel(mass.get(c, np.full(shape, np.nan))) for c in CATEGORIES])

    row = share_map(one, 1, 2 * C + C * size, f"ablate: {what}")[0]
    mass = row[2 * C:].reshape(C, *shape)
    return (_loss_dict(row[:2 * C]),
            {c: mass[i] for i, c in enumerate(CATEGORIES) if np.isfinite(mass[i]).all()})


class _Counting:
    """A loss_fn with a progress bar over its calls (each is a pass over the records); it
    passes on the routing masses of the last call (`last_dropped_mass`, `last_category_mass`,
    `last_expert_mass`) and the units' firing (`last_unit_firing`, its activation magnitude
    `last_unit_magnitude`, and the records it rests on, `firing_records`)."""

    def __init__(self, fn, total: int, desc: str):
        self.fn, self.total, self.desc = fn, total, desc

    def __enter__(self) -> "_Counting":
        from tqdm.auto import tqdm

        self.bar = tqdm(total=self.total, desc=self.desc, unit="pass", file=sys.stderr)
        return self

    def __call__(self, mask):
        try:
            return self.fn(mask)
        finally:
            self.bar.update(1)

    def counted(self, run):
        """`run` (a MaskRunner) that first sets the bar's total to this process's share of its
        masks: for a check of one round whose size is known only once drawn (neurons with
        `ablation.neuron_mass_matched: where_warned`)."""
        import jax

        def runner(loss_fn, masks):
            # (after the passes already made: the baseline, where it measured the firing)
            self.bar.total = self.bar.n + len(range(jax.process_index(), len(masks), jax.process_count()))
            self.bar.refresh()
            return run(loss_fn, masks)
        return runner

    # What the check reads off the loss_fn after a call, passed on (None where it gives none).
    PASSED_ON = ("last_dropped_mass", "last_category_mass", "last_expert_mass", "last_unit_firing",
                 "last_unit_magnitude", "firing_records", "coverage")

    def __getattr__(self, name):  # (only for names the instance itself lacks)
        if name in _Counting.PASSED_ON:
            return getattr(self.fn, name, None)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __exit__(self, *exc):
        self.bar.close()


def _as_compared(fp: dict[str, Any] | None) -> dict[str, Any] | None:
    """An ablation fingerprint with its identify rule cut to the parameters the ablated sets
    depend on (`IdentifyConfig.parameters_used` of the kind's count field): a change of the
    others leaves the sets, and so the check, as they were."""
    from sparcom_jax.analysis.ablate import FIELD_KIND
    from sparcom_jax.analysis.identify import IdentifyConfig

    if not fp or not isinstance(fp.get("identify"), dict):
        return fp
    kind = (fp.get("ablation") or {}).get("kind")
    field = next((f for f, k in FIELD_KIND.items() if k == kind), None)
    return {**fp, "identify": IdentifyConfig.parameters_used(fp["identify"], field)}


def _stored_ablation(f: Path, fp: dict[str, Any], held_out: dict[str, Any], *, overwrite: bool, **fix):
    """The AblationResult stored in `f` when it was made with fingerprint `fp` (compared
    `_as_compared`; reused whole, its environment is recorded by the report, `input_environments`);
    None when there is no file, or `overwrite` recomputes it (made with other settings, without
    it: `stale` raises, naming the held-out records whose tokens changed from `held_out`,
    `held_out_fingerprint`'s digests)."""
    from sparcom_jax.analysis import AblationResult

    if not f.is_file():
        return None
    stored = json.loads(f.read_text())
    old = stored.get("fingerprint") or {}
    # A result stored before the held-out tokens were fingerprinted is refused once: comparing
    # what it has would reuse it after a tokenizer change, the one change its fingerprint misses.
    def why() -> dict[str, str | None]:
        known = "held_out_tokens" in old
        return {"held_out_tokens": changed_records(stored.get("held_out"), held_out) if known
                else HELD_OUT_TOKENS_UNKNOWN}

    if stale(f, _as_compared(old), _as_compared(fp), overwrite=overwrite, details=why, **fix):
        return None
    return AblationResult.from_dict(stored)


def load_ablations(cfg: ExperimentConfig, out: Path, analyses: Analyses) -> dict:
    """The causal-check results of earlier `sparcom ablate` runs, each checked against the
    current settings (a result made with others stops the report)."""
    found = {}
    if not cfg.ablation.enabled:
        return found
    records = None
    for spec in ablation_models(cfg, out):
        ma = analyses.models.get(spec.label)
        held = None
        for kind in ABLATION_SECTIONS:
            f = _ablation_file(out, spec.label, kind)
            if ma is None or not f.is_file():
                continue
            records = records if records is not None else ablate_records(cfg)
            held = held or held_out_fingerprint(cfg, spec, records)
            fp = {**ablation_fingerprint(cfg, spec, records, kind, ma.meta.get("fingerprint")), **held[0]}
            found[(spec.label, kind)] = _stored_ablation(
                f, fp, held[1], overwrite=False,
                fix="run `sparcom ablate --overwrite` first, or set ablation.enabled=false")
    return found


# --------------------------------------------------------------------------- #
# report
# --------------------------------------------------------------------------- #

def data_description(cfg: ExperimentConfig, analyses: Analyses | None = None) -> dict[str, Any]:
    """The summary's "data" section: where the records come from and how they were split,
    how the analysed records group into near-duplicates (`grouping_summary`), and (scope
    "content", given the analyses) per counted model how much instruction/input
    text max_length left out (`sparcom_jax.stats.collect.content_cut_summary`)."""
    from sparcom_jax.data.splits import grouping_summary

    _, split = record_parts(cfg)
    d = cfg.data
    if cfg.finetuned is not None:
        tuned_on = "none here: the fine-tuned model was given, not made by this run"
    elif own_train_files(cfg):
        tuned_on = "train_data (its own files, checked disjoint from the analysed records)"
    else:
        tuned_on = "every record (no split)" if d.split is None else "the train part of data.split"
    out = {"path": d.path or "shipped", "n_per_category": d.n_per_category, "template": d.template,
           "max_length": d.max_length, "scope": d.scope, "splits": split, "fine_tuning_records": tuned_on,
           "grouping": grouping_summary(identify_records(cfg), d.group_by, d.group_threshold)}
    if analyses is not None and d.scope == "content":
        out["content_cut"] = {ma.name: ma.meta.get("content_cut")
                              for ma in (*analyses.models.values(), *analyses.controls.values())}
    return out


def _compared(cfg: ExperimentConfig, out: Path, analyses: Analyses) -> dict[str, Any]:
    """What report_stage takes from compare_stage (with one model, only the precision check)."""
    if len(analyses.models) < 2:
        return {"precision": precision_agreement(cfg, analyses)}
    c = compare_stage(cfg, out, analyses=analyses)
    return {k: c["_" + k] for k in ("comparison", "series", "controls", "precision")}


def input_environments(cfg: ExperimentConfig, out: Path, analyses: Analyses,
                       ablation: Mapping[tuple[str, str], Any]) -> dict[str, list[dict[str, Any]]]:
    """summary.json's environments of the outputs the report's numbers come from (the fine-tuning
    run, each model's counts, the causal checks shown), paths relative to OUT where under it:

    - "environment_changes": each output, and each part of one made under several, made under
      other versions of what can change a number than the report's (`note_environment`), with
      whether the change can alter a number here ("matters": where the counts and causal checks
      set against each other differ among themselves, `note_mixed`; the report's own numpy and
      the fine-tuned weights, fixed files, cannot);
    - "environment_parts": each output made under several environments (a resumed collection or
      training run) {"stage", "output", "parts": [{"part", "environment"}], "text"}: "counts/base
      made under jax 0.10.1 (chunks 0-3) and jax 0.10.2 (chunks 4-7)".
    """
    computed = [("collect", str(ma.meta.get("store") or ma.name), counts_parts(ma.meta))
                for ma in (*analyses.models.values(), *analyses.controls.values())]
    for label, kind in ablation:
        f = _ablation_file(out, label, kind)
        if f.is_file():
            computed.append(("ablate", str(f), output_parts(json.loads(f.read_text()))))
    current = environment()
    changes, trained = [], []
    if fine_tunes(cfg) and (out / "train" / FINGERPRINT_FILE).is_file():
        trained = [("finetune", str(out / "train"), train_parts(out / "train"))]
        changes += note_environment("report", out / "train", trained[0][2], made_by="finetune", current=current,
                                    fields=READ_ONLY)
    changes += note_mixed("report", computed, current=current)

    def shown(path: str) -> str:
        with contextlib.suppress(ValueError):  # (outside OUT: collect.store)
            return str(Path(path).relative_to(out))
        return path

    for c in changes:
        c["output"] = shown(c["output"])
    several = [{"stage": stage, "output": shown(path),
                "parts": [{"part": p["part"], "environment": p["environment"]} for p in parts],
                "text": parts_line(shown(path), parts, [p["part"] for p in parts])}
               for stage, path, parts in trained + computed if len(parts) > 1]
    return {"environment_changes": changes, "environment_parts": several}


def report_stage(cfg: ExperimentConfig, out: Path, *, analyses: Analyses | None = None,
                 compared: dict[str, Any] | None = None, ablation: dict | None = None, **_) -> dict[str, Any]:
    """Assemble summary.json and write the report directory (OUT/report/); `compared` is
    `_compared`'s result when compare already ran."""
    from sparcom_jax.analysis import build_summary
    from sparcom_jax.report import write_report

    analyses = analyses or analyze_all(cfg, out, full=True)
    c = compared if compared is not None else _compared(cfg, out, analyses)
    if ablation is None:  # from earlier `sparcom ablate` files
        ablation = load_ablations(cfg, out, analyses)
    # The summary holds one model's causal check: the fine-tuned model's when there are several.
    names = list(analyses.models)
    abl_model = next((n for n in reversed(names) if any(k[0] == n for k in ablation)), None)
    specs = model_list(cfg, out)
    summary = build_summary(
        analyses.models, config=cfg.identify.to_rule(), comparison=c.get("comparison"), series=c.get("series"),
        ablation=ablation.get((abl_model, "neurons")), ablation_experts=ablation.get((abl_model, "experts")),
        ablation_expert_neurons=ablation.get((abl_model, "expert_neurons")),
        model_paths={s.label: s.path or "random init" for s in specs},
        data=data_description(cfg, analyses), scope=cfg.data.scope,
        templates={ma.name: ma.meta.get("template") for ma in (*analyses.models.values(),
                                                               *analyses.controls.values())},
        controls=c.get("controls") or None, precision=c["precision"],
        extra={"experiment": cfg.name, "ablation_model": abl_model,
               "ablation_not_shown": sorted({k[0] for k in ablation} - {abl_model}),
               "fingerprint": _analysis_fingerprint(cfg, analyses, True), "environment": environment(),
               **input_environments(cfg, out, analyses, ablation)},
    )
    rdir = out / "report"
    with primary_writes(f"report: writing {rdir}") as writes:
        if writes:
            # Written aside and renamed in: no table or set list of an earlier report stays beside this
            # one, and a failed or interrupted report leaves the earlier one, not a partial one.
            with timed(f"report: writing {rdir}"), atomic_dir(rdir) as tmp:
                write_report(tmp, summary, analyses=analyses.models,
                             title=cfg.report.title or f"SPARCOM: {cfg.name}", dpi=cfg.report.dpi)
    return {"report": str(rdir / "index.html"), "summary": str(rdir / "summary.json"), "_summary": summary}


# --------------------------------------------------------------------------- #
# All stages, one stage
# --------------------------------------------------------------------------- #

def fine_tunes(cfg: ExperimentConfig) -> bool:
    """Whether `run` fine-tunes the base model itself (no fine-tuned model given)."""
    return cfg.finetuned is None


def run_all(cfg: ExperimentConfig, out: Path, *, progress: bool = True, overwrite: bool = False) -> dict[str, Any]:
    """Every stage in order: (finetune when no fine-tuned model is given), collect,
    identify, evaluate, compare, ablate, report."""
    if fine_tunes(cfg):
        finetune_stage(cfg, out, progress=progress, overwrite=overwrite)
    collect_stage(cfg, out, progress=progress, overwrite=overwrite)
    analyses = analyze_all(cfg, out, full=True)
    identify_stage(cfg, out, analyses=analyses)
    evaluate_stage(cfg, out, analyses=analyses)
    compared = _compared(cfg, out, analyses)
    abl = ablate_stage(cfg, out, analyses=analyses, overwrite=overwrite) if cfg.ablation.enabled else {}
    r = report_stage(cfg, out, analyses=analyses, compared=compared, ablation=abl.get("_results", {}))
    return {"report": r["report"], "summary": r["summary"], "out": str(out)}


STAGE_FUNCS: dict[str, Callable[..., dict]] = {
    "finetune": finetune_stage, "collect": collect_stage, "identify": identify_stage,
    "evaluate": evaluate_stage, "compare": compare_stage, "ablate": ablate_stage,
    "report": report_stage, "run": run_all,
}


def preflight(stage: str, cfg: ExperimentConfig, out: Path) -> None:
    """The checks every stage makes before any work or output: the models it needs exist (with
    their tokenizers, where it tokenizes: `require_tokenizers`, as the dry run) and can be loaded
    (`check_model_dirs`), the records
    load, split and sample, and fine-tuned checkpoints in OUT were tuned as the config says
    (`check_checkpoints_current`), and the causal check's records have responses (`check_responses`)."""
    from sparcom_jax.data.records import check_responses

    if stage == "finetune" or (stage == "run" and fine_tunes(cfg)):
        require_models([cfg.base])
        require_tokenizers(cfg, [cfg.base], ("finetune",))
        check_model_dirs(cfg, [cfg.base], ("finetune",))
        train_records(cfg)
    if stage != "finetune":
        specs = model_list(cfg, out, finetune_pending=stage == "run" and fine_tunes(cfg))
        require_models(specs)
        require_tokenizers(cfg, specs, stages_run(stage))
        check_model_dirs(cfg, specs, stages_run(stage))
        identify_records(cfg)
    if stage not in ("finetune", "run"):  # (`run` fine-tunes first, and its finetune checks them)
        check_checkpoints_current(cfg, out)
    if stage in ("ablate", "run") and cfg.ablation.enabled:
        check_responses(ablate_records(cfg))


def run_key(stage: str, cfg: ExperimentConfig, overwrite: bool) -> dict[str, Any]:
    """What every process of a multi-host run must agree on before a stage: the stage,
    --overwrite and the config, without its paths (each host may mount the files at its own
    path), by dotted name (`identify.eps`), so that a refusal can name what differs. What the
    paths hold is compared where it is used (the records and model digests by `collect`, the
    ablated model and records by `ablate`), and the output directory is probed (`check_shared`)."""
    from sparcom_jax.config import to_dict

    return {"command": stage, "--overwrite": bool(overwrite), **_dotted(to_dict(cfg, paths=False))}


def _dotted(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested dict's leaves by dotted key; lists and empty dicts are leaves."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping) and v:
            out.update(_dotted(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def run_stage(stage: str, cfg: ExperimentConfig, out: Path, *, overwrite: bool = False) -> dict[str, Any]:
    """Run one stage (or "run" for all) under the output directory's lock.

    The resolved config is saved as OUT/config.yaml once the stage has finished, so a stage
    that stops (outputs made with other settings, an error, an interrupt) leaves the config
    of the outputs that are there.

    Returns:
      {label: path} of the outputs (internal objects dropped).
    """
    from sparcom_jax.parallel.processes import check_same, together

    key = run_key(stage, cfg, overwrite)
    check_same(key, "the command (stage, --overwrite) or config",
               "start every process with the same command line and config file", parts=key)
    with contextlib.ExitStack() as held:
        # A host that cannot write --out, or another run's lock: every process stops.
        with together(f"{stage}: locking the output directory"):
            prepare_out_dir(out)
            if is_primary():
                log_stale_lock(held.enter_context(DirLock(out, "output directory")))
        # The directories every host must see are probed before the models and records are checked.
        check_shared(out)
        if cfg.collect.store and stage != "finetune":  # the count stores, when not under OUT
            check_shared(Path(cfg.collect.store), "collect.store")
        with together(f"{stage}: checking the models and records"):  # one host's files: every process stops
            preflight(stage, cfg, out)
        res = STAGE_FUNCS[stage](cfg, out, overwrite=overwrite)
        save_resolved(cfg, out)
        # The others wait for process 0's last writes (the report): a process that exits first would
        # have jax.distributed's shutdown give up on process 0 after its timeout, and stop it.
        barrier("sparcom:stage-done")
    return {"config": str(out / "config.yaml"),
            **{k: v for k, v in res.items() if not str(k).startswith("_")}}
