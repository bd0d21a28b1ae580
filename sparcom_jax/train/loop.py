"""Supervised instruction fine-tuning: the loop that turns a base model into its tuned self
(usage: see `sparcom_jax.train`).

Everything that can be wrong with the settings (batch split over devices,
optimizer name, lengths against the model, a run directory that belongs to
another run) is checked before tokenizing or touching a device. The data order,
the optimizer and the compiled step depend only on the config and the data, so
the same seed gives the same losses, and a run resumed from a checkpoint
continues with exactly the losses it would have had.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import sys
import time
import uuid
import warnings
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from sparcom_jax.models.transformer import CausalLM
from sparcom_jax.parallel.mesh import check_mesh, make_mesh
from sparcom_jax.parallel.processes import together
from sparcom_jax.runtime import ensure_compilation_cache, put_batch
from sparcom_jax.train.batches import TrainBatches, eval_batches, resolve_buckets
from sparcom_jax.fileio import atomic_write, write_json
from sparcom_jax.fingerprint import params_checksum
from sparcom_jax.train.checkpointing import (CHECKPOINT_SUBDIR, RUN_FILE, TOKENIZER_SUBDIR, TrainCheckpointer,
                                             orbax_errors_held, read_run)
from sparcom_jax.train.config import _NON_NUMERIC_FIELDS, TrainConfig, TrainConfigError
from sparcom_jax.train.optim import make_optimizer
from sparcom_jax.train.step import (abstract_state, compute_graphdef, init_state, make_eval_step, make_shardings,
                                    make_train_step, master_shardings, pure_params)

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"


@dataclasses.dataclass
class FinetuneResult:
    """What `finetune` returns.

    Attributes:
      model: the fine-tuned model (float32 parameters, the input model's compute dtype).
      run_dir: the run directory.
      checkpoint_steps: the steps with a checkpoint on disk (0 is "before", final_step "after").
      metrics_path: the JSONL metrics file.
      final_step: the last optimizer step (total_steps).
      losses: {step: train loss} for the steps this call ran.
    """

    model: CausalLM
    run_dir: Path
    checkpoint_steps: list[int]
    metrics_path: Path
    final_step: int
    losses: dict[int, float]


def read_metrics(path: str | Path, kind: str | None = "train") -> list[dict]:
    """The lines of a metrics JSONL file, optionally only those of one type ("train", "eval", ...)."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return [d for d in rows if kind is None or d.get("type") == kind]


class MetricsWriter:
    """Append-only JSONL; each line is flushed so a killed run loses at most the line being written.

    Only the process that is `enabled` (process 0) writes, but every process makes each call:
    an error of the writer (a full disk) is raised on every process together (`together`),
    where the others went on to their next training step and waited there for process 0."""

    def __init__(self, path: Path, *, resume_step: int | None, enabled: bool = True):
        self.path, self.enabled = path, enabled
        with together(f"finetune: writing {path}"):
            if not enabled:
                return
            if resume_step is not None and path.exists():
                # Steps after the restored checkpoint will be run again; drop their old lines so the
                # file reads as one uninterrupted run.
                keep = [ln for ln in path.read_text().splitlines()
                        if (step := _line_step(ln)) is not None and step <= resume_step]
                atomic_write(path, "".join(ln + "\n" for ln in keep))
            elif resume_step is None and path.exists():
                path.unlink()
            self.f = open(path, "a")

    def write(self, **row: Any) -> None:
        with together(f"finetune: writing {self.path}"):
            if self.enabled:
                self.f.write(json.dumps(row) + "\n")
                self.f.flush()

    def close(self) -> None:
        if self.enabled:
            self.f.close()


def _line_step(line: str) -> int | None:
    try:
        return int(json.loads(line).get("step"))
    except (ValueError, TypeError, json.JSONDecodeError):
        return None  # a line cut by a kill


def _resolve_mesh(cfg: TrainConfig, mesh: Mesh | None) -> Mesh:
    if mesh is not None:
        if "data" not in mesh.shape:
            raise TrainConfigError(f"mesh axes {tuple(mesh.shape)} have no 'data' axis; build it with "
                                   "sparcom_jax.make_mesh(data=..., model=...)")
        return mesh
    try:
        return make_mesh(cfg.mesh_data, cfg.mesh_model)
    except ValueError as e:
        raise TrainConfigError(f"mesh_data={cfg.mesh_data}, mesh_model={cfg.mesh_model}: {e}") from None


def _check_resume(run_dir: Path, cfg: TrainConfig, model_hf: dict, resume: bool) -> dict | None:
    """The previous run's description if this call continues it; raises if it cannot."""
    has_run = (run_dir / RUN_FILE).exists()
    ckpts = run_dir / CHECKPOINT_SUBDIR
    has_ckpts = ckpts.exists() and any(p.name.isdigit() for p in ckpts.iterdir())
    if not resume:
        if has_run or has_ckpts:
            raise TrainConfigError(f"out_dir={run_dir} already holds a fine-tuning run; pass resume=True to "
                                   "continue it, or choose a new out_dir")
        return None
    if not has_run:
        return None
    prev = read_run(run_dir)
    old = TrainConfig.from_dict(prev["train_config"])
    diff = [f"{k}: {getattr(old, k)!r} -> {getattr(cfg, k)!r}" for k in cfg.to_dict()
            if k not in _NON_NUMERIC_FIELDS and getattr(old, k) != getattr(cfg, k)]
    if diff:
        raise TrainConfigError(f"out_dir={run_dir} holds a run with other settings ({'; '.join(diff)}); resuming "
                               "it would not continue the same run. Use the same TrainConfig, or a new out_dir")
    if prev["model_config"] != model_hf:
        raise TrainConfigError(f"out_dir={run_dir} holds a run of another model architecture; use the run's base "
                               "model or a new out_dir")
    return prev


def _check_inputs(model: CausalLM, records: Sequence, tokenizer, cfg: TrainConfig, mesh: Mesh) -> None:
    if not isinstance(model, CausalLM):
        raise TypeError(f"model must be a sparcom_jax CausalLM, got {type(model).__name__}")
    if not records:
        raise ValueError("records is empty; pass the instruction records to fine-tune on")
    cfg.check_mesh(int(mesh.shape["data"]))
    cfg.check_model(model.config.max_position_embeddings)
    if len(tokenizer) > model.config.vocab_size:
        raise TrainConfigError(f"the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is "
                               f"{model.config.vocab_size}; use the model's own tokenizer")


def check_responses_cut(enc, records: Sequence, tokenizer, cfg: TrainConfig) -> None:
    """Refuse training records that `max_length` cuts before their response begins, or with
    `cfg.allow_cut_responses` warn about them (a `DataWarning`); either names the categories.
    Records without a response at all are refused or warned about first (`check_responses`).

    Such a record has no loss target: it is trained on nothing, while the run still
    lists it among its records. Prompts are longest in some categories (a summary
    carries its text), so the records lost are mostly those of one category, and the
    tuned model is barely tuned on it: a before/after change there would then say
    little about instruction tuning. Hence a refusal by default, before any compute.

    Args:
      enc: `records` encoded with `cfg.template`, scope "response" and `cfg.max_length`.

    Raises:
      TrainConfigError: some records keep no response token, and not `cfg.allow_cut_responses`.
      ValueError: no training record of a category has a response (`check_responses`).
    """
    from sparcom_jax.data import DataWarning, encode_records
    from sparcom_jax.data.records import check_responses
    from sparcom_jax.stats.losses import response_targets

    check_responses(records, "fine-tuning")
    lost = np.flatnonzero(response_targets(enc) == 0).tolist()
    if not lost:
        return
    whole = encode_records([records[i] for i in lost], tokenizer, template=cfg.template, scope="response",
                           max_length=None)
    cut, every = Counter(enc.categories[i] for i in lost), Counter(enc.categories)
    per = ", ".join(f"{c} {cut[c]} of {every[c]}" for c in sorted(cut))
    allowed = cfg.allow_cut_responses
    msg = (f"max_length={cfg.max_length} cuts {len(lost)} of {len(enc)} training records before their response "
           f"begins ({per}; e.g. {', '.join(enc.record_ids[i] for i in lost[:3])}): they "
           f"{'are' if allowed else 'would be'} trained on nothing, so those categories "
           f"{'are' if allowed else 'would be'} under-tuned. Raise max_length to at least "
           f"{int(whole.prompt_lens.max()) + 1} ({int(whole.lengths.max())} keeps them whole), or leave those "
           "records out")
    if not allowed:
        raise TrainConfigError(f"{msg}; or set allow_cut_responses=true to train on the other records anyway")
    warnings.warn(msg, DataWarning, stacklevel=3)


def _evaluate(eval_step, params, batches, categories: list[str], sh) -> dict[str, Any]:
    """Mean response-token loss per category (token-weighted) and overall."""
    loss_sum: dict[str, float] = defaultdict(float)
    n_sum: dict[str, float] = defaultdict(float)
    for b in batches:
        l_B, n_B = eval_step(params, *(put_batch(x, sh.batch_BT, global_batch=True)
                                       for x in (b.ids_BT, b.mask_BT, b.targets_BT)))
        l_B, n_B = np.asarray(l_B, np.float64), np.asarray(n_B, np.float64)
        for r, l, n in zip(b.rows, l_B, n_B):
            if r >= 0:
                loss_sum[categories[r]] += l
                n_sum[categories[r]] += n
    per = {c: loss_sum[c] / n_sum[c] for c in sorted(n_sum) if n_sum[c] > 0}
    total_n = sum(n_sum.values())
    return {"loss": per, "mean": sum(loss_sum.values()) / max(total_n, 1.0),
            "tokens": {c: int(n_sum[c]) for c in sorted(n_sum)}}


def _finish_interrupted(ckpt: TrainCheckpointer, run_dir: Path, losses: dict[int, float], first: int,
                        total_steps: int, *, say: bool) -> None:
    """After Ctrl-C: let the checkpoint being written land, close the manager, and say what is
    saved and where the run resumes (when `say`). A second Ctrl-C gives the write up: orbax
    writes a checkpoint under a temporary name and renames it when complete, so one given up
    is never read (a resume removes it)."""
    if say and ckpt.saving():
        print(f"{run_dir}: interrupted; finishing the checkpoint being written (Ctrl-C again gives it up)",
              file=sys.stderr, flush=True)
    ckpt.wait()
    kept = ckpt.all_steps()
    ckpt.close()
    if not say:
        return
    done = max(losses, default=first)
    saved = (f"checkpoints of steps {', '.join(map(str, kept))} are in {ckpt.directory}; the same call resumes "
             f"from step {kept[-1]}" if kept else "no checkpoint was saved yet; the same call starts it again")
    print(f"{run_dir}: fine-tuning interrupted after step {done} of {total_steps}: {saved}", file=sys.stderr,
          flush=True)


# Cadence fields do not enter the compiled programs; normalising them lets those be reused.
_CADENCE = {k: TrainConfig.__dataclass_fields__[k].default for k in _NON_NUMERIC_FIELDS}


@functools.lru_cache(maxsize=4)
def _programs(model_cfg, cfg: TrainConfig, total_steps: int, mesh: Mesh):
    """Optimizer, shardings, the jitted learning-rate schedule (step -> rate) and the jitted steps,
    reused by later calls with the same settings.

    A new jit-wrapped closure would compile again; caching them lets a resumed or
    repeated run in the same process (a notebook, the resume test) skip compilation.
    The train step takes each step's rate as an input (`make_train_step`'s `tx_at`): runs
    that differ only in their schedule (the demo's pretraining and fine-tuning) share its
    program through the persistent compilation cache, the same floats as the schedule in-graph.
    """
    tx, sched = make_optimizer(cfg, total_steps)
    sh = make_shardings(model_cfg, tx, mesh)
    graphdef = compute_graphdef(model_cfg, cfg.compute_dtype)
    tx_at = lambda lr: make_optimizer(cfg, total_steps, learning_rate=lambda _count: lr)[0]  # noqa: E731
    return (tx, sh, jax.jit(sched), make_train_step(graphdef, tx, sh, tx_at=tx_at),
            make_eval_step(graphdef, sh))


def finetune(model: CausalLM, records: Sequence, tokenizer, cfg: TrainConfig, out_dir: str | Path, *,
             mesh: Mesh | None = None, eval_records: Sequence | None = None, resume: bool = True,
             progress: bool = True, callback: Callable[[int, dict], Any] | None = None) -> FinetuneResult:
    """Fine-tune `model` on instruction records, saving orbax checkpoints before, during and after.

    Args:
      model: the base model (its parameters are copied, never changed). When the
        run resumes, the state comes from the latest checkpoint, and `model` must
        be the base the run started from (a checksum of its weights is compared).
      records: training `Record`s (instruction, input, output, category), or anything
        `load_instructions` reads (a file, dicts, a DataFrame), read with its defaults.
      tokenizer: the model's tokenizer (saved into the run directory); None: the model
        directory's, or the shipped one for a model made in memory (`resolve_tokenizer`).
      cfg: the settings; see `TrainConfig`.
      out_dir: the run directory (see `sparcom_jax.train.checkpointing`).
      mesh: a ("data", "model") mesh; default ``make_mesh(cfg.mesh_data, cfg.mesh_model)``.
      eval_records: records for the per-category eval loss at each checkpoint;
        default: the training records.
      resume: continue from the latest checkpoint in out_dir if there is one;
        with False, out_dir must not hold a run.
      progress: show a tqdm bar with loss, tokens/s and ETA.
      callback: called as ``callback(step, metrics)`` after every step; a truthy
        return stops training after that step (the checkpoints written so far stay).

    Returns:
      FinetuneResult.

    Raises:
      TrainConfigError: a setting that cannot work, before any compute.
    """
    from sparcom_jax.data import as_records, encode_records, resolve_tokenizer

    ensure_compilation_cache()
    check_mesh(mesh, "finetune")
    records = as_records(records, "finetune")
    eval_records = None if eval_records is None else as_records(eval_records, "finetune")
    tokenizer = resolve_tokenizer(model, tokenizer)
    run_dir = Path(out_dir)
    lead = jax.process_index() == 0
    # ---- checks: nothing below compiles or allocates on a device until they pass ----
    cfg.validate()
    mesh = _resolve_mesh(cfg, mesh)
    _check_inputs(model, records, tokenizer, cfg, mesh)
    model_hf = model.config.to_hf_config()
    prev = _check_resume(run_dir, cfg, model_hf, resume)

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="truncated .* sequences")  # reported once below instead
        enc = encode_records(records, tokenizer, template=cfg.template, scope="response", max_length=cfg.max_length)
        ev_enc = enc if eval_records is None else encode_records(eval_records, tokenizer, template=cfg.template,
                                                                 scope="response", max_length=cfg.max_length)
    check_responses_cut(enc, records, tokenizer, cfg)
    if enc.n_truncated:
        log.warning("%d of %d training sequences were cut to max_length=%d", enc.n_truncated, len(enc),
                    cfg.max_length)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    # The training ladder comes from the training sequences alone: eval records that reached it
    # would change the padded shapes (hence the float sums and the data fingerprint), so a run
    # with another held-out set would neither match nor resume this one.
    buckets = resolve_buckets(enc.lengths, cfg.max_length, cfg.buckets)
    data = TrainBatches(enc.ids, enc.scopes, batch_size=cfg.batch_size, grad_accum=cfg.grad_accum,
                        buckets=buckets, seed=cfg.seed, pad_id=pad_id)
    total_steps = cfg.total_steps or cfg.epochs * data.steps_per_epoch
    if cfg.warmup_steps >= total_steps:
        raise TrainConfigError(f"warmup_steps={cfg.warmup_steps} must be smaller than the {total_steps} steps "
                               "of the run; lower warmup_steps or raise total_steps/epochs")
    fingerprint = data.fingerprint()
    if prev is not None and prev.get("data_fingerprint") != fingerprint:
        raise TrainConfigError(f"out_dir={run_dir} holds a run on other data (or another tokenizer/template); "
                               "resume it with the same records, or use a new out_dir")
    ev_batches = eval_batches(ev_enc.ids, ev_enc.scopes, batch_size=cfg.eval_batch_size or cfg.micro_batch_size,
                              buckets=resolve_buckets(ev_enc.lengths, cfg.max_length, cfg.buckets), pad_id=pad_id)
    # The run's checkpoints descend from the base it started with: resumed with another model
    # of the same architecture, the series would still start ("before") at the first one.
    # Checksummed where the train state will hold them (`init_state` starts from these): a base on one
    # device and the result of an earlier run (the demo's pretraining, then its fine-tuning) share one
    # compiled checksum program instead of one per placement.
    base_params = jax.device_put(pure_params(model), master_shardings(model.config, mesh))
    base_checksum = params_checksum(base_params)
    if prev is not None and prev.get("base_checksum", base_checksum) != base_checksum:
        raise TrainConfigError(f"out_dir={run_dir} holds a run that started from another base model (same "
                               "architecture, other weights); resume it with its own base model, or use a new "
                               "out_dir")

    # ---- run directory ----
    # Process 0 writes it alone; its error (a full disk) stops every process here, not the others
    # at their first training step with an error that does not name it (`together`).
    with together(f"finetune: writing {run_dir / RUN_FILE} and the tokenizer"):
        if lead:
            run_dir.mkdir(parents=True, exist_ok=True)
            if prev is None:
                write_json(run_dir / RUN_FILE, {
                    # Tells this run from an earlier one with the same settings in a removed directory
                    # (another base, or weights that differ run to run): exports record it.
                    "run_id": uuid.uuid4().hex, "base_checksum": base_checksum, "model_config": model_hf,
                    "train_config": cfg.to_dict(), "total_steps": total_steps,
                    "steps_per_epoch": data.steps_per_epoch, "buckets": list(buckets),
                    "data_fingerprint": fingerprint, "n_records": len(enc), "mesh": dict(mesh.shape)})
                tokenizer.save_pretrained(str(run_dir / TOKENIZER_SUBDIR))

    # ---- state ----
    tx, sh, rate, train_step, eval_step = _programs(model.config, dataclasses.replace(cfg, **_CADENCE), total_steps, mesh)
    ckpt = TrainCheckpointer(run_dir, save_every=cfg.save_every, keep_last=cfg.keep_last, final_step=total_steps,
                             async_save=cfg.async_checkpointing)
    start = ckpt.latest_step() if resume else None
    if start is not None:
        del base_params  # the state comes from the checkpoint
        state, meta = ckpt.restore(start, abstract_state(model.config, tx, sh))
        if meta.get("data_fingerprint") != fingerprint or meta.get("train_fingerprint") != cfg.fingerprint():
            raise TrainConfigError(f"checkpoint {start} in {run_dir} was written by another run configuration")
        tokens_seen = int(meta["tokens_seen"])
        log.info("resuming %s from step %d", run_dir, start)
        if progress and lead:  # say so: a resumed run runs only the steps after its last checkpoint
            print(f"{run_dir}: " + (f"already trained to step {total_steps} with the same settings; reusing it"
                                    if start >= total_steps else
                                    f"an earlier run with the same settings stopped after step {start} of "
                                    f"{total_steps}; resuming from its checkpoint there"),
                  file=sys.stderr, flush=True)
    else:
        state, tokens_seen = init_state(base_params, tx, sh), 0
        del base_params
    metrics = MetricsWriter(run_dir / METRICS_FILE, resume_step=start, enabled=lead)
    if start is not None:
        metrics.write(type="resume", step=start)

    def checkpoint(step: int) -> None:
        if not ckpt.should_save(step):
            return
        ev = _evaluate(eval_step, state.params, ev_batches, ev_enc.categories, sh)
        metrics.write(type="eval", step=step, **ev)
        ckpt.save(state, {"step": step, "epoch": step // data.steps_per_epoch, "tokens_seen": tokens_seen,
                          "data_fingerprint": fingerprint, "train_fingerprint": cfg.fingerprint()})
        metrics.write(type="checkpoint", step=step)

    from tqdm.auto import tqdm

    first = start or 0
    bar = tqdm(total=total_steps, initial=first, disable=not progress or not lead, unit="step", dynamic_ncols=True)
    losses: dict[int, float] = {}
    # orbax's threads log a failed write (a full disk) at length before the save raises it: held,
    # so that the one-line error comes first (and alone)
    interrupted = False
    with orbax_errors_held():
        try:
            if start is None:
                checkpoint(0)  # the base model: "before"
            batch = data.batch(first) if first < total_steps else None
            t_last = time.perf_counter()
            tok_since = 0
            for s in range(first, total_steps):
                # The rate of the optimizer's step s (its update count, as the state's step, is s), as
                # a host scalar: every process passes the same value to the replicated input.
                lr = np.asarray(rate(np.int32(s)))
                state, m = train_step(state, lr, *(put_batch(x, sh.batch_ABT, global_batch=True)
                                                   for x in (batch.ids_ABT, batch.mask_ABT, batch.targets_ABT)))
                cur = batch
                # Prepare the next batch on the host while the device runs this step.
                batch = data.batch(s + 1) if s + 1 < total_steps else None
                m = {k: float(v) for k, v in jax.device_get(m).items()}
                step = s + 1
                tokens_seen += cur.tokens
                tok_since += cur.tokens
                losses[step] = m["loss"]
                if not math.isfinite(m["loss"]):
                    raise FloatingPointError(f"step {step}: loss is {m['loss']}; lower learning_rate or clip_norm")
                now = time.perf_counter()
                row = {"step": step, "epoch": cur.epoch, "loss": m["loss"], "lr": m["lr"],
                       "grad_norm": m["grad_norm"], "tokens": cur.tokens, "slots": int(cur.ids_ABT.size),
                       "target_tokens": int(m["targets"]),
                       "tokens_per_s": tok_since / max(now - t_last, 1e-9), "tokens_seen": tokens_seen}
                if step % cfg.log_every == 0 or step == total_steps:
                    metrics.write(type="train", **row)
                bar.set_postfix(loss=f"{m['loss']:.4f}", tok_s=f"{row['tokens_per_s']:.0f}", refresh=False)
                bar.update(1)
                if step % cfg.log_every == 0:
                    tok_since, t_last = 0, now
                stop = bool(callback(step, row)) if callback is not None else False
                if ckpt.should_save(step):
                    checkpoint(step)
                    t_last, tok_since = time.perf_counter(), 0  # eval and save time are not training time
                if stop:
                    break
        except KeyboardInterrupt:
            interrupted = True
            raise
        finally:
            bar.close()
            metrics.close()
            if interrupted:
                _finish_interrupted(ckpt, run_dir, losses, first, total_steps, say=progress and lead)
            else:
                ckpt.wait()  # async writes must land before the caller reads (or the process exits)
                kept = ckpt.all_steps()
                ckpt.close()

    gd, _, rest = nnx.split(model, nnx.Param, ...)
    tuned = nnx.merge(gd, nnx.State(state.params), rest)
    return FinetuneResult(tuned, run_dir, kept, run_dir / METRICS_FILE, total_steps, losses)
