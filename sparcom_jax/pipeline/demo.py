"""The embedded end-to-end demo (`sparcom demo`): tiny Llama and Mixtral-style pairs,
pretrained briefly, instruction-tuned, then analysed by the stages of `run_all`.

    DIR/checkpoints/<pair>-base|-step<k>|-chat/hf   the series of each pair
    DIR/pairs/<pair>/                               each pair's stage outputs
    DIR/report/index.html, summary.json             both pairs on one page
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import time
from html import escape as html_escape
from pathlib import Path
from typing import Any, Mapping, Sequence

from sparcom_jax.config import DemoConfig, ExperimentConfig, ModelSpec, apply_overrides
from sparcom_jax.console import fmt_count
from sparcom_jax.fileio import DirLock, atomic_dir, atomic_write, prepare_out_dir, write_json
from sparcom_jax.pipeline.common import log, log_stale_lock, record_parts, save_resolved, timed, with_vocab
from sparcom_jax.pipeline.stages import export_checkpoints, guard_dir, run_all, train_fingerprint

# One padded length everywhere (one compilation per step function), a few steps, few records.
# A smoke run, not a result: at 64 tokens most SUM training records lose their whole response
# (allowed here, so finetune warns; the full demo fine-tunes at 256, which would cost the fast one
# a minute more).
FAST_OVERRIDES = (
    "pretrain.total_steps=6", "pretrain.batch_size=8", "pretrain.warmup_steps=1", "pretrain.max_length=64",
    "pretrain.buckets=[64]", "pretrain.save_every=6",
    "finetune.total_steps=4", "finetune.batch_size=8", "finetune.warmup_steps=1", "finetune.save_every=2",
    "finetune.max_length=64", "finetune.buckets=[64]", "finetune.allow_cut_responses=true",
    "data.n_per_category=4", "data.max_length=64",
    "collect.buckets=[64]", "identify.n_boot=5", "identify.n_perm=19", "ablation.n_random=2",
    "ablation.max_records=2", "ablation.batch_size=12", "collect.batch_size=8", "report.dpi=60",
)


def demo_config(fast: bool = False, overrides: Sequence[str] = (), base: DemoConfig | None = None) -> DemoConfig:
    """`base` (default: the demo's defaults), shrunk by FAST_OVERRIDES when `fast`, then `overrides`."""
    cfg = base if base is not None else DemoConfig()
    if fast:
        cfg = apply_overrides(cfg, ["fast=true", *FAST_OVERRIDES])
    return apply_overrides(cfg, list(overrides))


def _pair_experiment(demo: DemoConfig, pair_name: str, ckpts: list[dict[str, Any]]) -> ExperimentConfig:
    base, *mid, last = ckpts
    return ExperimentConfig(
        name=f"demo-{pair_name}",
        base=ModelSpec(name=base["name"], path=base["path"], template=demo.data.template),
        series=[ModelSpec(name=d["name"], path=d["path"], template=demo.finetune.template) for d in mid],
        finetuned=ModelSpec(name=last["name"], path=last["path"], template=demo.finetune.template),
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


def _train_pair(demo: DemoConfig, pair, out: Path, tok, records, held_out, overwrite: bool) -> list[dict[str, Any]]:
    """Pretrain a tiny model briefly on plain text ("before"), instruction-tune it and
    export step 0, the intermediate and the final checkpoints.

    Both runs train on `records` (the train part of the demo's split) and report their
    eval loss on `held_out` (records of the ablate part, never trained on). Returns the
    series entries [{"name", "step", "path"}]."""
    from sparcom_jax import train as T
    from sparcom_jax.fingerprint import digest
    from sparcom_jax.models.config import ModelConfig
    from sparcom_jax.models.transformer import init_model

    arch = with_vocab(pair.architecture, tok)
    for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
        arch.setdefault(k, getattr(tok, k))
    # One fingerprint for the pair's whole training chain: a changed pretraining must not
    # leave an instruction-tuned model of the old base in place.
    fp = {"pretrain": train_fingerprint(digest({"init": arch, "seed": demo.seed}), demo.pretrain,
                                        plain_text_records(records), tok),
          "finetune": train_fingerprint("pretrained", demo.finetune, records, tok)}
    run = out / "train" / pair.name
    guard_dir(run, "demo-train", fp, overwrite=overwrite, extra=list((out / "checkpoints").glob(f"{pair.name}-*")))
    mcfg = ModelConfig.from_hf_config(arch, source=f"demo pair {pair.name}")
    model = init_model(mcfg, seed=demo.seed)
    with timed(f"demo {pair.name}: pretraining {fmt_count(mcfg.param_count())} parameters on plain text "
               f"({len(records)} records)"):
        res = T.finetune(model, plain_text_records(records), tok, demo.pretrain, run / "pretrain",
                         eval_records=plain_text_records(held_out), progress=True)
    with timed(f"demo {pair.name}: instruction fine-tuning ({len(records)} records)"):
        T.finetune(res.model, records, tok, demo.finetune, run / "sft", eval_records=held_out, progress=True)
    names = lambda s, f: T.series_name(s, f, before=f"{pair.name}-base", after=f"{pair.name}-chat",  # noqa: E731
                                       middle=f"{pair.name}-step{{step}}")
    return export_checkpoints(run / "sft", out / "checkpoints", names, tok)


def run_demo(out: str | os.PathLike, fast: bool = False, cfg: DemoConfig | None = None, *,
             overwrite: bool = False) -> dict[str, Any]:
    """The embedded end-to-end demo: tiny Llama and Mixtral-style pairs, trained and analysed.

    1. splits the shipped records into disjoint train / identify / ablate parts
       (data.split; stratified by category, near-duplicates together);
    2. builds each tiny model with the shipped tokenizer, pretrains it briefly on
       plain text of the train part and saves the "before" checkpoint;
    3. instruction-fine-tunes it on the train part, saving intermediate and "after"
       checkpoints as HF directories under OUT/checkpoints/<name>/hf;
    4. collects (on the identify part), identifies, evaluates, compares (with the
       series and the same-template control) and runs the causal check (on the
       ablate part) for each pair (OUT/pairs/<pair>/);
    5. writes the report: OUT/report/index.html (both pairs), summary.json and
       figures (OUT/report/<pair>/figures).

    Args:
      out: output directory.
      fast: shrink everything (a minute on 2 cores; tests).
      cfg: a DemoConfig (default: `demo_config(fast)`).
      overwrite: recompute outputs made with other settings instead of stopping.

    Returns:
      {"report": index.html, "summary": summary.json, "checkpoints": dir, "out": dir}.
    """
    from sparcom_jax.data import default_tokenizer, sample_balanced
    from sparcom_jax.runtime import ensure_compilation_cache

    cfg = cfg or demo_config(fast)
    out = Path(prepare_out_dir(out))
    t0 = time.perf_counter()
    with DirLock(out, "demo output directory") as lock:
        log_stale_lock(lock)
        ensure_compilation_cache()  # compiled steps are shared with later runs (sparcom_jax.runtime)
        tok = default_tokenizer()
        parts, _ = record_parts(ExperimentConfig(name="demo", data=cfg.data))
        held_out = sample_balanced(parts["ablate"], 2, seed=cfg.seed + 7)
        summaries, pages = {}, {}
        for pair in cfg.pairs:
            ckpts = _train_pair(cfg, pair, out, tok, parts["train"], held_out, overwrite)
            exp = _pair_experiment(cfg, pair.name, ckpts)
            pout = out / "pairs" / pair.name
            pout.mkdir(parents=True, exist_ok=True)
            res = run_all(exp, pout, overwrite=overwrite)
            save_resolved(exp, pout)
            summaries[pair.name] = summary = json.loads(Path(res["summary"]).read_text())
            # The pair's models were tuned here, not by its run: their training's versions join its list.
            summary["environment_changes"] = _train_changes(out, pair.name) + summary["environment_changes"]
            pages[pair.name] = Path(res["report"])
        report = write_demo_report(out / "report", summaries, pages, title=cfg.report.title or "sparcom demo")
        # Last, as the stages do: a demo stopped by outputs made with other settings (or an error,
        # or Ctrl-C) leaves the config of the outputs that are there.
        save_resolved(cfg, out)
    log(f"demo finished in {time.perf_counter() - t0:.0f} s")
    return {"report": str(report), "summary": str(out / "report" / "summary.json"),
            "checkpoints": str(out / "checkpoints"), "out": str(out)}


def _train_changes(out: Path, pair: str) -> list[dict[str, Any]]:
    """The environment changes (`note_environment`) of a pair's training (OUT/train/<pair>) from this
    process's, its path relative to OUT."""
    from sparcom_jax.pipeline.provenance import READ_ONLY, note_environment
    from sparcom_jax.pipeline.stages import train_parts

    run = out / "train" / pair
    # (fixed weights counted afresh: recorded, never mixed; `input_environments`)
    changes = note_environment("demo", run, train_parts(run), made_by="finetune", fields=READ_ONLY)
    return [{**c, "output": f"train/{pair}"} for c in changes]


# Said at the top of the demo page: readers publish what the tool shows.
DEMO_CAVEAT = ("The demo trains tiny models briefly on a few hundred records: it shows that the pipeline runs "
               "end to end and what its report holds. Its numbers say nothing about the instruction-specific "
               "neurons or experts of real LLMs, and a demo result (significant or not) is no evidence for or "
               "against the method's claims.")


def write_demo_report(rdir: Path, summaries: dict[str, dict], pages: dict[str, Path], title: str) -> Path:
    """One page for every pair: each pair's full report (figures and tables) under its heading.

    Copies each pair's report directory to rdir/<pair>/ and writes rdir/index.html
    and rdir/summary.json (`merge_pair_summaries`: the pairs merged at the top level,
    and each pair's own summary under "pairs"). The directory is built aside and renamed
    in (`atomic_dir`): a failed or interrupted write leaves the earlier report whole.
    """
    with atomic_dir(rdir) as tmp:
        _write_demo_report(tmp, summaries, pages, title)
    return rdir / "index.html"


def _write_demo_report(rdir: Path, summaries: dict[str, dict], pages: dict[str, Path], title: str) -> None:
    parts = []
    head = None
    for name, page in pages.items():
        shutil.copytree(page.parent, rdir / name)
        html = page.read_text()
        start = html.index("<body>") + len("<body>")
        head = head or html[:start]
        body = html[start:html.rindex("</body>")]
        body = re.sub(r"<h1>(.*?)</h1>", rf'<h1 id="{name}">\1</h1>', body, count=1)
        body = body.replace('<figure id="', f'<figure id="{name}-')
        parts.append(f'<section class="pair">{body}<p><a href="{name}/index.html">{name} report alone</a>'
                     f" · files in <code>{name}/</code></p></section>")
    toc = "".join(f'<li><a href="#{n}">{n}</a></li>' for n in pages)
    head = re.sub(r"<title>.*?</title>", f"<title>{title}</title>", head or "<html><body>")
    merged = merge_pair_summaries(summaries)
    # (each pair's page lists its own; the pairs' training is the demo's)
    mixed = "; ".join(f"{c['pair']}: {c['output']} ({c['package']} {c['old']} -> {c['new']})"
                      for c in merged["environment_changes"] if c.get("matters", True))  # (recorded: all)
    mixed = (f"<p>Reused outputs made under other versions than this demo's: {html_escape(mixed)}. Its numbers "
             "mix two environments.</p>") if mixed else ""
    doc = (f"{head}<h1>{title}</h1><p>{DEMO_CAVEAT}</p>{mixed}<p>Model pairs:</p><ul>{toc}</ul>{''.join(parts)}"
           "</body></html>")
    atomic_write(rdir / "index.html", doc)
    write_json(rdir / "summary.json", merged)


# Summary sections merged key by key across pairs (model names are unique) -> how many levels
# deep (controls.same_template.isn from one pair, .ise from another).
_MERGE_DEPTH = {"model_paths": 1, "models": 1, "templates": 1, "comparison": 1, "series": 1, "ablation": 1,
                "controls": 2}


def merge_pair_summaries(summaries: Mapping[str, dict]) -> dict[str, Any]:
    """One summary.json for several pairs: theirs merged at the top level, theirs kept under "pairs".

    "models", "model_paths" and "templates" become the union of the pairs'; "comparison",
    "series" and "ablation" are merged key by key (a dense pair brings comparison.isn,
    ablation.isn and ablation.random; an MoE pair comparison.ise, ablation.ise, ...),
    "controls" one level deeper (controls.same_template.isn, .ise, ...), "environment_changes" and
    "environment_parts" are every pair's lists, each entry with its "pair"; every other key (identification, data, scope, ...) is taken from the first pair
    that has it. Where pairs give one key different values, the first pair's value
    is kept (two mappings with no key in common, e.g. comparison.moves, are united)
    and "merged_from" maps the dotted key to the pair it was kept from.

    Args:
      summaries: {pair name: that pair's summary.json dict}, in pair order.

    Returns:
      A new dict; the inputs are not modified.
    """
    merged: dict[str, Any] = {}
    merged_from: dict[str, str] = {}
    owner: dict[str, str] = {}

    def put(dst: dict, key: str, value: Any, pair: str, dotted: str) -> None:
        if key not in dst:
            dst[key], owner[dotted] = value, pair
        elif isinstance(dst[key], Mapping) and isinstance(value, Mapping) and not set(dst[key]) & set(value):
            dst[key] = {**dst[key], **value}
        elif dst[key] != value:
            merged_from[dotted] = owner[dotted]

    def merge(dst: dict, value: Mapping | None, depth: int, pair: str, dotted: str) -> None:
        for k, v in (value or {}).items():
            if depth > 1:
                merge(dst.setdefault(k, {}), v, depth - 1, pair, f"{dotted}.{k}")
            else:
                put(dst, k, v, pair, f"{dotted}.{k}")

    for pair, summary in summaries.items():
        for key, value in summary.items():
            if key in _MERGE_DEPTH:
                merge(merged.setdefault(key, {}), value, _MERGE_DEPTH[key], pair, key)
            else:
                put(merged, key, value, pair, key)
    # Every pair's outputs made under other versions (or under several), each named with its pair.
    for key in ("environment_changes", "environment_parts"):
        merged[key] = [{"pair": pair, **c} for pair, summary in summaries.items() for c in summary.get(key) or ()]
        merged_from.pop(key, None)
    merged["merged_from"] = merged_from
    merged["pairs"] = dict(summaries)
    return merged
