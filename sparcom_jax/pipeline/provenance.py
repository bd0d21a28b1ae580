"""What each stage's outputs were made from, and the one rule for reusing them.

The rule (docs/cli.md, "Reusing finished work"): a stage reuses earlier outputs only
when their fingerprint equals the fingerprint of the current inputs and settings.
When they differ, the stage stops with a one-line error that names what differs and
the flag that recomputes them (``--overwrite``); with that flag it recomputes and
logs why. A resumed run whose settings still match resumes as before.

Fingerprints (`sparcom_jax.fingerprint`) per stage:

- finetune: base model (weights files), training settings, fine-tuning records and
  their tokens -> OUT/train/fingerprint.json; each exported checkpoint records its
  run and step (OUT/checkpoints/<name>/export.json). The later stages check that
  fingerprint against the current config before they use the checkpoints
  (`sparcom_jax.pipeline.stages.check_checkpoints_current`).
- collect: model, records, template, scope, max_length, dtype, the content caps
  (scope "content": the content tokens counted per record, the same for every model
  of the study; present when they cut this store's content) and the tokenized
  sequences -> the count store's meta.json (checked again on resume); max_length
  counts only when the tokens differ (`sparcom_jax.fingerprint.stale_keys`).
- identify, evaluate, compare, report: they recompute from the counts every time,
  after checking that the counts' fingerprints match the current settings; each
  writes the fingerprint of what it used beside its outputs.
- ablate: the model, its counts, the rule, the ablation settings and records, the
  held-out sequences the loss is measured on (their tokens: a tokenizer change that
  touches only held-out text changes no count), and the numerics the model runs in
  (collect.dtype and collect.gate_dtype, those of the counts that chose the sets) -> in
  each OUT/ablate/<model>_<kind>.json, with a digest per held-out record to name those
  whose tokens changed; `report` checks it before using the file. A result stored
  without the held-out tokens (by an earlier version) is refused once: whether the
  tokenizer changed since cannot be told.

Every stage's fingerprint also holds `sparcom_jax.fingerprint.METHOD_VERSION` (`with_method`; absent while it is
1), so that results made before a change of what a stage computes are refused.

Beside each fingerprint (fingerprint.json, a count store's meta.json "meta", each ablate file, and
summary.json) every stage records the `sparcom_jax.fingerprint.environment` it computed under:
python, the packages' versions, the JAX backend and devices, sparcom_jax's commit; work resumed
under another environment keeps every one with the chunks or steps each made
(`sparcom_jax.fingerprint.with_environment`). Versions are not in the fingerprint (a patch release
must not force recomputing a week of counts); a stage that reuses work made under other versions
says so where the change can alter a number there (`note_environment` with the stage's fields:
beside new model computation, or a resumed training run; `note_mixed` for the numpy stages, which
are affected only where the outputs they set against each other differ; docs/cli.md, "What an
environment change can affect"), and the report lists every change in summary.json's
"environment_changes" (with "matters") and every output of several environments in its
"environment_parts".
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from sparcom_jax.config import ExperimentConfig, ModelSpec
from sparcom_jax.errors import StaleResultError
from sparcom_jax.fingerprint import (
    MODEL_COMPUTE, RESULT_AFFECTING, UNRECORDED, changed_records, describe, digest, digest_arrays, environment,
    environment_changes, environment_parts, model_files_fingerprint, part_ranges, record_digests, result_values,
    stale_keys, with_method,
)
from sparcom_jax.pipeline.common import log, template_for

# Component names -> what the user calls them (config keys), for messages.
LABELS = {
    "model": "model weights", "records": "records (data.path, data.split, data.n_per_category, data.seed)",
    "template": "template", "scope": "data.scope", "max_length": "data.max_length", "dtype": "collect.dtype",
    "tokens": "tokenized text (tokenizer or record text)", "train": "train settings", "base": "base model weights",
    "identify": "identify settings", "ablation": "ablation settings", "counts": "counts",
    "sums": "collect.sums (the stored counts lack the activation sums)",
    "gate_dtype": "collect.gate_dtype",
    "held_out_tokens": "held-out records' tokenized text (tokenizer or record text)",
    "method": "method version (sparcom_jax.fingerprint.METHOD_VERSION, unset = 1: a later sparcom_jax computes "
              "this stage differently)",
    "groups": "group keys (near-duplicate groups under data.group_by; the text changed where no counted token did)",
    "grouping": "near-duplicate groups kept with the counts (data.group_by, data.group_threshold)",
    "content_caps": "content caps (instruction/input tokens counted per record, the fewest that survive "
                    "data.max_length under any model and template of the study)",
}


def spec_model_fingerprint(spec: ModelSpec) -> str:
    """Digest of a model of the config without loading it: its files, or its random init."""
    if spec.path:
        return model_files_fingerprint(spec.path)
    return digest({"init": spec.init, "seed": spec.seed})


def spec_tokenizer(spec: ModelSpec):
    """The tokenizer a model is used with (its directory's; the shipped one for a random
    `init` model), without its weights.

    Raises:
      ValueError: the model's directory holds no tokenizer.
    """
    from sparcom_jax.data import default_tokenizer

    if spec.path:
        from sparcom_jax.checkpoints.hf import load_tokenizer
        from sparcom_jax.data.tokenizer import missing_tokenizer

        tok = load_tokenizer(spec.path)
        if tok is None:
            raise missing_tokenizer(spec.path)
        return tok
    return default_tokenizer()


def collect_fingerprint(cfg: ExperimentConfig, spec: ModelSpec, records, template: str, *,
                        dtype: str | None = None, gate_dtype: str | None = None,
                        tokenizer=None, content_caps: Mapping[str, int] | None = None,
                        model_digest: str | None = None) -> tuple[dict[str, Any], Any]:
    """(fingerprint components, EncodedSet) of one model's counts on `records`, in `dtype`
    (default collect.dtype) with `gate_dtype`, under the study's `content_caps`
    (scope "content"; `sparcom_jax.pipeline.stages.study_content_caps`). `model_digest`:
    the model's `spec_model_fingerprint` when the caller has it (computing it may read every
    byte of the weights)."""
    import warnings

    from sparcom_jax.data import encode_records
    from sparcom_jax.stats.collect import content_caps_fingerprint

    tok = tokenizer or spec_tokenizer(spec)
    with warnings.catch_warnings():  # the collection itself reports truncation once
        warnings.simplefilter("ignore")
        enc = encode_records(records, tok, template=template, scope=cfg.data.scope, max_length=cfg.data.max_length,
                             content_caps=content_caps)
    # The records' labels too: the analyses group the counts by category and stratify by source.
    fp = {"model": model_digest or spec_model_fingerprint(spec), "dtype": dtype or cfg.collect.dtype,
          "records": digest([[r.id, r.category, r.source] for r in records]),
          "template": template, "scope": cfg.data.scope, "max_length": cfg.data.max_length,
          "tokens": digest_arrays(enc.ids, enc.scopes), "sums": cfg.collect.sums}
    if gate_dtype:  # absent when unused, so counts made before the option existed still match
        fp["gate_dtype"] = gate_dtype
    if cfg.data.group_by != "text":  # absent for identical-text groups, the rule of stores made before
        fp["grouping"] = f"{cfg.data.group_by} >= {cfg.data.group_threshold}"
    fp.update(content_caps_fingerprint(enc, content_caps))
    return with_method(fp), enc


# `describe`'s detail for a causal-check result stored without its held-out tokens.
HELD_OUT_TOKENS_UNKNOWN = (
    "or not: the result was stored by an earlier sparcom_jax, which did not fingerprint the held-out "
    "tokens, so a tokenizer change since cannot be told; recompute it once")


def held_out_fingerprint(cfg: ExperimentConfig, spec: ModelSpec, records, tokenizer=None, *, encoded=None
                         ) -> tuple[dict[str, str], dict[str, Any]]:
    """The causal check's "held_out_tokens" component: a digest of the sequences its loss is
    measured on (`sparcom_jax.stats.losses.encode_held_out`, under the model's template and
    data.max_length, with `tokenizer`, default the model's; or `encoded`, those sequences
    made already), and what is kept beside it to name changed records: {"ids",
    "categories", "token_digests"} (`record_digests`).

    The settings and the record text are in `ablation_fingerprint` already; the tokenizer is
    not, and a tokenizer change that touches only held-out text leaves the counts as they were.
    """
    import warnings

    from sparcom_jax.stats.losses import encode_held_out

    enc = encoded
    if enc is None:
        with warnings.catch_warnings():  # the causal check itself reports truncation
            warnings.simplefilter("ignore")
            enc = encode_held_out(records, tokenizer or spec_tokenizer(spec), template=template_for(spec, cfg),
                                  max_length=cfg.data.max_length)
    return {"held_out_tokens": digest_arrays(enc.ids, enc.scopes)}, record_index(enc)


def record_index(enc) -> dict[str, Any]:
    """What is kept beside a fingerprint of the `EncodedSet` `enc`'s tokens to name the records
    whose tokens changed (`changed_records`): {"ids", "categories", "token_digests"}."""
    return {"ids": enc.record_ids, "categories": enc.categories, "token_digests": record_digests(enc.ids, enc.scopes)}


def token_changes(header: Mapping[str, Any] | None, enc) -> dict[str, str | None]:
    """`describe`'s details of the "tokens" component: the records of the `EncodedSet` `enc`
    whose tokens differ from those a count store's `header` keeps (`changed_records`)."""
    return {"tokens": changed_records(header, record_index(enc))}


Details = Mapping[str, str | None]


def changes(stored: Mapping[str, Any] | None, current: Mapping[str, Any],
            details: Details | Callable[[], Details | None] | None = None) -> str | None:
    """What differs between outputs fingerprinted `stored` and the fingerprint `current`, in
    one phrase with the names the user knows (`describe`, `LABELS`), or None when they match
    (`stale_keys`). `details` as in `stale`."""
    keys = stale_keys(stored, current)
    if not keys:
        return None
    if callable(details):
        details = details()
    return describe(keys, stored, current, LABELS, details=details)


def stale(where: str | Path, stored: Mapping[str, Any] | None, current: Mapping[str, Any],
          *, overwrite: bool, fix: str = "re-run with --overwrite to recompute it, or choose another --out",
          details: Details | Callable[[], Details | None] | None = None) -> bool:
    """Whether outputs with fingerprint `stored` must be recomputed for `current`.

    Returns False when they match (reuse them). When they differ: raises
    StaleResultError naming the difference (with `details` of the components that have
    them, `describe`) and `fix`, unless `overwrite`, in which case it logs why and
    returns True. `details` may be a function returning them: it is called only when the
    fingerprints differ (naming changed records hashes every record's tokens).
    """
    what = changes(stored, current, details)
    if what is None:
        return False
    if not overwrite:
        raise StaleResultError(f"{where}: made with other inputs or settings ({what}); {fix}")
    log(f"{where}: recomputing (--overwrite): {what}")
    return True


_said: set[str] = set()  # the environment changes this process has logged (each once)

# Where a stage reuses an output, the environment values whose change can alter its numbers
# (`sparcom_jax.fingerprint.MODEL_COMPUTE`, `TRAINING`; docs/cli.md, "What an environment change can
# affect"). Reading finished outputs with numpy, or counting fine-tuned weights (fixed files,
# fingerprinted by content) afresh, sets no computation of two environments against each other.
READ_ONLY: tuple[str, ...] = ()


def output_parts(holder: Mapping[str, Any] | None, total: int | None = None, first: int = 0) -> list[dict[str, Any]]:
    """`environment_parts` of an output's record (a count store's meta, a fingerprint.json), each
    with the "part" it made (`part_ranges`: "chunks 0-3", of `total` units numbered from
    `first`) when there are several."""
    parts = environment_parts(holder)
    if len(parts) > 1:
        for p, r in zip(parts, part_ranges(parts, total, first)):
            p["part"] = r
    return parts


def note_environment(stage: str, output: str | Path, made_under: Mapping[str, Any] | list | None, *,
                     made_by: str | None = None, current: Mapping[str, Any] | None = None,
                     fields: Sequence[str] = RESULT_AFFECTING) -> list[dict[str, Any]]:
    """The changes (`environment_changes`) between the environment(s) an output that `stage` reuses
    was made under (`made_under`: one environment, None when not recorded, or the output's
    `output_parts`) and `current` (default this process's), as summary.json's
    "environment_changes" entries {"stage" (`made_by`, the stage that made the output; default
    `stage`), "output", "part" (the part of an output of several environments), "package",
    "old", "new", "matters"}.

    Every change is recorded; "matters" says whether it can change a number where `stage`
    reuses the output: `fields` are the values that can (`MODEL_COMPUTE` beside new model
    computation, `TRAINING` for a resumed run, `READ_ONLY` where it cannot), and an output that
    recorded none may differ in any of them. Those that matter are logged in one line naming
    the stage, the output and each change (once per process and output: the stages of one run
    reuse the same counts)."""
    parts = made_under if isinstance(made_under, list) else [{"environment": made_under}]
    current = current or environment()
    entries = []
    for p in parts or [{"environment": None}]:
        for c in environment_changes(p["environment"], current):
            matters = c["package"] in fields or (c == UNRECORDED and bool(fields))
            entries.append({"stage": made_by or stage, "output": str(output), **({"part": p["part"]} if "part" in p
                                                                                  else {}), **c, "matters": matters})
    _say(stage, f"reusing {output}, made under other versions than this run's", [c for c in entries if c["matters"]])
    return entries


def _say(stage: str, what: str, changes: list[dict[str, Any]]) -> None:
    """One line (once per process) naming `changes` that can matter."""
    if not changes:
        return
    named = ", ".join(f"{c['package']} {c['old']} -> {c['new']}" + (f" ({c['part']})" if "part" in c else "")
                      for c in changes)
    if f"{what} ({named})" not in _said:
        _said.add(f"{what} ({named})")
        log(f"{stage}: {what} ({named}); its numbers mix the two (summary.json's environment_changes lists every "
            "such output)")


def note_mixed(stage: str, outputs: Sequence[tuple[str, str | Path, list]], *,
               current: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """`note_environment` entries of model computations that a stage reading them with numpy sets
    against each other (`outputs`: (made_by, output, `output_parts`), e.g. the counts before and
    after fine-tuning, the parts of one store, the causal checks). Against this process's
    environment nothing matters (`READ_ONLY`: numpy recomputes from integer counts and stored
    losses); among them a difference in `MODEL_COMPUTE` does, so an entry "matters" when its
    value is one the outputs do not share (or was not recorded), and those are logged."""
    current = current or environment()
    entries = [c for made_by, output, parts in outputs
               for c in note_environment(stage, output, parts, made_by=made_by, current=current, fields=READ_ONLY)]
    values: dict[str, set] = {k: set() for k in MODEL_COMPUTE}
    for _, _, parts in outputs:
        for p in parts or [{"environment": None}]:
            for k, v in (result_values(p["environment"]) if p["environment"] else {}).items():
                if k in values:
                    values[k].add(v)
    mixed = {k for k, v in values.items() if len(v) > 1}
    for c in entries:
        c["matters"] = c["package"] in mixed or c["package"] == UNRECORDED["package"]
    unknown = sorted({c["output"] for c in entries if c["package"] == UNRECORDED["package"]})
    named = [f"{output}" + (f" ({p['part']})" if "part" in p else "") + ": "
             + ", ".join(f"{k} {result_values(p['environment'])[k]}" for k in sorted(mixed))
             for _, output, parts in outputs for p in parts if p["environment"] and mixed]
    named += [f"{output}: not recorded" for output in unknown]
    _say_mixed(stage, named)
    return entries


def _say_mixed(stage: str, named: list[str]) -> None:
    """The line of `note_mixed`, naming each output (with its versions) once per process: the stages
    of one `sparcom run` set the same counts against each other (analyse, for identify, evaluate
    and compare; then the report, with the causal checks), and the report's line names only what
    it adds (a causal check made under other versions) beside the outputs named above."""
    new = [n for n in dict.fromkeys(named) if n not in _said]
    if not new:
        return
    _said.update(new)
    log(f"{stage}: outputs set against each other here were made under different versions ({'; '.join(new)}"
        + ("; beside the outputs named above" if len(new) < len(set(named)) else "")
        + "): the differences between them mix the two; recompute one under the other's versions "
        "(summary.json's environment_changes lists them)")
