"""Finished work is reused only when it was made with the same inputs and settings.

Every stage that reuses outputs is run once, then asked again with one setting changed:
it must stop with an error naming that setting (before loading any weights), recompute
with overwrite=True, and reuse the outputs when nothing changed.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sparcom_jax.config import apply_overrides, from_dict
from sparcom_jax.config import ExperimentConfig
from sparcom_jax.errors import LockedError, StaleResultError
from sparcom_jax.train import TrainConfigError
from sparcom_jax.fileio import LOCK_NAME, DirLock
from sparcom_jax.pipeline import stages
from sparcom_jax.pipeline.stages import run_stage

TINY_ARCH = dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
EXP = {
    "name": "prov",
    "base": {"name": "base", "init": TINY_ARCH, "seed": 0, "template": "plain"},
    "finetuned": {"name": "tuned", "init": TINY_ARCH, "seed": 1, "template": "chat"},
    "data": {"n_per_category": 2, "max_length": 48},
    "identify": {"eps": 0.05, "n_boot": 0, "n_perm": 0},
    "collect": {"batch_size": 12, "buckets": [48]},
    "ablation": {"n_random": 1, "max_records": 2, "batch_size": 12, "kinds": ["neurons"]},
}


def exp(*overrides):
    return apply_overrides(from_dict(ExperimentConfig, json.loads(json.dumps(EXP)), "test"), list(overrides))


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    """An output directory where collect, ablate and report ran with EXP."""
    out = tmp_path_factory.mktemp("prov") / "out"
    run_stage("run", exp(), out)
    return out


def no_weights(monkeypatch):
    def fail(*a, **k):
        raise AssertionError("weights were loaded")
    monkeypatch.setattr(stages, "load_spec_model", fail)


def counted(monkeypatch, *names) -> list[str]:
    """The names of the `stages` functions `names` in the order they are called from now on."""
    calls = []

    def wrap(name, real):
        def f(*a, **k):
            calls.append(name)
            return real(*a, **k)
        return f

    for name in names:
        monkeypatch.setattr(stages, name, wrap(name, getattr(stages, name)))
    return calls


# (override, the name the error must give for it)
CHANGES = [
    ("data.scope=prompt", "data.scope: 'content' -> 'prompt'"),
    ("data.max_length=40", "data.max_length: 48 -> 40"),
    ("collect.dtype=bfloat16", "collect.dtype: 'float32' -> 'bfloat16'"),
    ("data.n_per_category=1", "records"),
    ("data.seed=5", "records"),
    ("data.split_seed=3", "records"),
    ("base.template=chat", "template: 'plain' -> 'chat'"),
    ("base.seed=7", "model weights changed"),
]


@pytest.mark.parametrize("override,named", CHANGES)
def test_collect_refuses_counts_made_with_other_settings(done, override, named, monkeypatch):
    no_weights(monkeypatch)
    with pytest.raises(StaleResultError) as e:
        run_stage("collect", exp(*override.split()), done)
    msg = str(e.value)
    assert named in msg and "--overwrite" in msg and "\n" not in msg


@pytest.mark.parametrize("stage", ["identify", "evaluate", "compare", "report", "ablate"])
def test_analysis_stages_refuse_counts_that_no_longer_match(done, stage, monkeypatch):
    no_weights(monkeypatch)
    saved = (done / "config.yaml").read_text()
    with pytest.raises(StaleResultError, match=r"data.scope: 'content' -> 'all'.*sparcom collect --overwrite"):
        run_stage(stage, exp("data.scope=all"), done)
    # OUT/config.yaml still describes the outputs there, not the refused settings
    assert (done / "config.yaml").read_text() == saved and "scope: content" in saved


def test_counts_refused_for_an_edited_record_name_the_record(done, monkeypatch):
    # The refusal said only "tokenized text (tokenizer or record text) changed".
    import dataclasses

    no_weights(monkeypatch)
    cfg, real = exp(), stages.identify_records
    r = real(cfg)[4]

    def edited(cfg):
        recs = list(real(cfg))
        recs[4] = dataclasses.replace(r, instruction=r.instruction.replace(" ", "  ", 1) + "!")
        return recs

    monkeypatch.setattr(stages, "identify_records", edited)
    named = rf"tokenized text \(tokenizer or record text\) changed \(1 of 12 records: '{r.id}' \({r.category}\)\)"
    with pytest.raises(StaleResultError, match=named):
        run_stage("collect", cfg, done)
    with pytest.raises(StaleResultError, match=named):
        stages.open_model_counts(cfg, done, cfg.base)


def test_unchanged_settings_reuse_everything_without_loading_weights(done, monkeypatch):
    no_weights(monkeypatch)
    # which records' tokens changed is worked out only for a refusal (it hashes every record's tokens)
    named = counted(monkeypatch, "token_changes", "changed_records")
    before = {p: p.stat().st_mtime_ns for p in (done / "counts").rglob("meta.json")}
    # batch size, buckets and dispatch do not change counts: they are not in the fingerprint
    res = run_stage("run", exp("collect.batch_size=5", "collect.buckets=null", "collect.moe_impl=tiled"), done)
    assert {p: p.stat().st_mtime_ns for p in (done / "counts").rglob("meta.json")} == before
    assert json.loads((done / "report" / "summary.json").read_text())["ablation"]["isn"] is not None
    assert res["report"].endswith("index.html")
    assert named == []


def test_same_template_control_is_counted_and_compared(done):
    assert (done / "counts" / "tuned_under_plain_template" / "meta.json").is_file()
    ctrl = json.loads((done / "compare" / "same_template.json").read_text())
    assert ctrl["before"] == "base" and ctrl["after"] == "tuned under plain template"
    summary = json.loads((done / "report" / "summary.json").read_text())
    assert summary["templates"] == {"base": "plain", "tuned": "chat", "tuned under plain template": "plain"}
    assert summary["controls"]["same_template"]["after"] == "tuned under plain template"
    # the control's instruction-level figures are computed, not left null beside the main comparison's
    moves = summary["controls"]["same_template"]["moves"]["isn"]
    assert moves["diagonal_dominance"]["after"] is not None and moves["instruction_overlap_delta"] is not None
    assert moves["diagonal_dominance"]["before"] == summary["comparison"]["moves"]["isn"]["diagonal_dominance"]["before"]


def test_counts_of_another_process_count_keep_the_causal_check_valid(done, tmp_path, monkeypatch):
    """A collection on P processes leaves one store per process (process k: records k, k+P, ...);
    merged, they are the counts one process counts, so the stages after collect fingerprint
    them alike: a causal check made from one layout is reused with the other."""
    import shutil

    from sparcom_jax.data import resolve_tokenizer
    from sparcom_jax.pipeline.common import counts_root, identify_records
    from sparcom_jax.pipeline.provenance import collect_fingerprint
    from sparcom_jax.stats.collect import collect_instructions

    out = tmp_path / "out"
    shutil.copytree(done, out)
    cfg = exp()
    spec = cfg.finetuned  # the ablated model
    one = stages.open_model_counts(cfg, out, spec)
    active = np.asarray(one.neuron_active[:])  # read before its store goes
    root = counts_root(cfg, out) / "tuned"
    shutil.rmtree(root)
    model = stages.load_spec_model(spec)
    records, caps = identify_records(cfg), stages.study_content_caps(cfg, out)
    for k in range(2):  # what collect_stage on two processes writes
        share = records[k::2]
        fp, _ = collect_fingerprint(cfg, spec, share, "chat", content_caps=caps)
        collect_instructions(model, share, resolve_tokenizer(model), template="chat", scope=cfg.data.scope,
                             max_length=cfg.data.max_length, out=root / f"process_{k}", progress=False,
                             buckets=[48], sums=cfg.collect.sums, fingerprint=fp, content_caps=caps)
    merged = stages.open_model_counts(cfg, out, spec)
    assert merged.ids == one.ids and merged.meta["fingerprint"] == one.meta["fingerprint"]
    np.testing.assert_array_equal(merged.neuron_active, active)
    no_weights(monkeypatch)
    kept = (out / "ablate" / "tuned_neurons.json").read_text()
    run_stage("ablate", cfg, out)
    run_stage("report", cfg, out)
    assert (out / "ablate" / "tuned_neurons.json").read_text() == kept


def test_ablation_results_are_checked_before_reuse_and_before_the_report(done, monkeypatch):
    no_weights(monkeypatch)
    # identify.eps changes the sets: the stored causal check no longer belongs to them
    with pytest.raises(StaleResultError, match=r"ablate/tuned_neurons.json.*identify settings changed"):
        run_stage("ablate", exp("identify.eps=0.1"), done)
    with pytest.raises(StaleResultError, match=r"identify settings changed.*sparcom ablate --overwrite"):
        run_stage("report", exp("identify.eps=0.1"), done)
    with pytest.raises(StaleResultError, match=r"ablation settings changed"):
        run_stage("ablate", exp("ablation.n_random=2"), done)
    # the cheap stages recompute from the (still matching) counts and record what they used
    run_stage("evaluate", exp("identify.eps=0.1"), done)
    fp = json.loads((done / "evaluate" / "fingerprint.json").read_text())["components"]
    assert fp["identify"]["eps"] == 0.1 and set(fp["counts"]) == {"base", "tuned", "control:same_template"}


def test_rule_parameters_the_ablated_sets_do_not_use_keep_the_causal_check(done, tmp_path, monkeypatch):
    # identify.threshold (under rule "top" the contrast rule's) and identify.eps_experts (ISEs only)
    # refused the neuron ablation and asked for --overwrite: a rerun that gives the same result.
    import shutil

    from sparcom_jax.fingerprint import difference

    no_weights(monkeypatch)
    out = tmp_path / "out"
    shutil.copytree(done, out)
    kept = (out / "ablate" / "tuned_neurons.json").read_text()
    run_stage("ablate", exp("identify.threshold=0.3", "identify.eps_experts=0.2"), out)
    run_stage("report", exp("identify.threshold=0.3", "identify.eps_experts=0.2"), out)
    assert (out / "ablate" / "tuned_neurons.json").read_text() == kept

    def changed(kind, old, new):
        rule = {"rule": "top", "eps": 0.05, "eps_experts": None, "threshold": 0.5, "ties": "break", "q": 0.5}
        fps = [stages._as_compared({"ablation": {"kind": kind}, "identify": {**rule, **d}}) for d in (old, new)]
        return difference(*fps) == ["identify"]

    # ... but the ISEs' share decides the experts' sets, and the threshold those of rule "absolute"
    assert changed("experts", {}, {"eps_experts": 0.2}) and not changed("experts", {}, {"eps_experts": 0.05})
    assert not changed("neurons", {}, {"eps_experts": 0.2}) and changed("neurons", {}, {"q": 0.6})
    absolute = {"rule": "absolute", "ties": "keep"}
    assert changed("neurons", absolute, {**absolute, "threshold": 0.3})
    assert not changed("neurons", absolute, {**absolute, "eps": 0.3})


def test_a_tokenizer_change_touching_only_held_out_text_refuses_the_causal_check(done, tmp_path, monkeypatch):
    """The counts hold the identify records' tokens, the causal check measures its loss on the
    held-out records': a tokenizer edit that changes only held-out tokens (a word that only one
    held-out record has becomes a vocabulary entry) leaves the counts valid and the check not."""
    import shutil

    import sparcom_jax.data as data
    from sparcom_jax.pipeline.common import ablate_records, identify_records

    out = tmp_path / "out"
    shutil.copytree(done, out)
    cfg, word = exp(), "Microplastics"
    assert not any(word in r.instruction + r.input + r.output for r in identify_records(cfg))
    held = [r for r in ablate_records(cfg) if word in r.instruction + r.input + r.output]
    assert len(held) == 1
    shipped = data.default_tokenizer

    def edited():
        tok = shipped()
        tok.add_tokens([word])
        return tok

    monkeypatch.setattr(data, "default_tokenizer", edited)
    no_weights(monkeypatch)
    run_stage("identify", cfg, out)  # the counts' tokens did not change
    named = rf"held-out records' tokenized text .*changed \(1 of 12 records: '{held[0].id}' \({held[0].category}\)\)"
    for stage in ("ablate", "report"):
        with pytest.raises(StaleResultError, match=named):
            run_stage(stage, cfg, out)


def test_a_causal_check_stored_without_its_held_out_tokens_is_refused(done, tmp_path, monkeypatch):
    """Its fingerprint cannot tell whether the tokenizer changed since: the refusal says so."""
    import shutil

    out = tmp_path / "out"
    shutil.copytree(done, out)
    f = out / "ablate" / "tuned_neurons.json"
    stored = json.loads(f.read_text())
    del stored["fingerprint"]["held_out_tokens"], stored["held_out"]
    f.write_text(json.dumps(stored))
    no_weights(monkeypatch)
    for stage in ("ablate", "report"):
        with pytest.raises(StaleResultError, match="earlier sparcom_jax, which did not fingerprint the held-out tok"):
            run_stage(stage, exp(), out)


def test_counts_with_activation_sums_serve_a_run_without_them(done, tmp_path, monkeypatch):
    """Counts collected with the sums hold what a run without them needs (the same counts of the same
    records in the same order): they are reused, not counted again, and the analysis gets them without
    the sums, as counts collected without them, fingerprinted as the store is (in either layout)."""
    import shutil

    out = tmp_path / "out"
    shutil.copytree(done, out)
    no_weights(monkeypatch)
    cfg = exp("identify.ties=keep", "collect.sums=false")  # ties=break reads the sums
    before = {p: p.stat().st_mtime_ns for p in (out / "counts").rglob("meta.json")}
    run_stage("collect", cfg, out)
    run_stage("identify", cfg, out)
    assert {p: p.stat().st_mtime_ns for p in (out / "counts").rglob("meta.json")} == before
    plain, full = stages.open_model_counts(cfg, out, cfg.base), stages.open_model_counts(exp(), out, cfg.base)
    assert plain.sums() == {} and set(full.sums()) == {"neuron_act_sum"}
    assert plain.ids == full.ids and plain.meta["fingerprint"] == full.meta["fingerprint"]
    np.testing.assert_array_equal(plain.neuron_active[:], full.neuron_active[:])


def test_counts_without_activation_sums_are_refused_for_a_run_that_asks_for_them(done, tmp_path, monkeypatch):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(done, out)
    meta = out / "counts" / "base" / "meta.json"
    header = json.loads(meta.read_text())
    meta.write_text(json.dumps({**header, "fingerprint": {**header["fingerprint"], "sums": False}}))
    no_weights(monkeypatch)
    named = r"collect.sums \(the stored counts lack the activation sums\): False -> True"
    with pytest.raises(StaleResultError, match=named):
        run_stage("collect", exp(), out)
    with pytest.raises(StaleResultError, match=named):
        run_stage("identify", exp(), out)


def test_an_unfinished_store_with_activation_sums_is_finished_with_them(done, tmp_path):
    """A run without sums resumes a store begun with them as it was begun (a store of one kind of
    rows), not refused nor started again."""
    import shutil

    out = tmp_path / "out"
    shutil.copytree(done, out)
    store = out / "counts" / "base"
    sums = np.asarray(stages.open_model_counts(exp(), out, exp().base).neuron_act_sum[:])
    (store / "progress.json").write_text(json.dumps({"done_chunks": 0}))
    run_stage("collect", exp("identify.ties=keep", "collect.sums=false"), out)
    again = stages.open_model_counts(exp(), out, exp().base)
    np.testing.assert_allclose(again.neuron_act_sum[:], sums, rtol=1e-5)


def test_counts_with_activation_sums_of_two_processes_serve_a_run_without_them(done, tmp_path):
    """Merged, the stores of a two-process collection with the sums are fingerprinted as one store
    of every record is (`test_counts_of_another_process_count_keep_the_causal_check_valid`), also
    for a run without the sums."""
    import shutil

    from sparcom_jax.data import resolve_tokenizer
    from sparcom_jax.pipeline.common import counts_root, identify_records
    from sparcom_jax.pipeline.provenance import collect_fingerprint
    from sparcom_jax.stats.collect import collect_instructions

    out = tmp_path / "out"
    shutil.copytree(done, out)
    cfg, plain = exp(), exp("identify.ties=keep", "collect.sums=false")
    one = stages.open_model_counts(plain, out, cfg.base)
    root = counts_root(cfg, out) / "base"
    shutil.rmtree(root)
    model = stages.load_spec_model(cfg.base)
    records, caps = identify_records(cfg), stages.study_content_caps(cfg, out)
    for k in range(2):  # what collect_stage on two processes writes
        fp, _ = collect_fingerprint(cfg, cfg.base, records[k::2], "plain", content_caps=caps)
        collect_instructions(model, records[k::2], resolve_tokenizer(model), template="plain", scope=cfg.data.scope,
                             max_length=cfg.data.max_length, out=root / f"process_{k}", progress=False,
                             buckets=[48], sums=True, fingerprint=fp, content_caps=caps)
    merged = stages.open_model_counts(plain, out, cfg.base)
    assert merged.sums() == {} and merged.meta["fingerprint"] == one.meta["fingerprint"]


def test_collect_refuses_a_count_store_of_another_format_version(done, tmp_path, monkeypatch):
    """Even with the same fingerprint: "already complete" would keep it, the analysis read it."""
    import shutil

    from sparcom_jax.stats.store import STORE_VERSION

    out = tmp_path / "out"
    shutil.copytree(done, out)
    meta = out / "counts" / "base" / "meta.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "version": STORE_VERSION + 1}))
    no_weights(monkeypatch)
    both = f"format version {STORE_VERSION + 1}, written by another sparcom_jax; this one reads version {STORE_VERSION}"
    with pytest.raises(StaleResultError, match=f"counts/base/meta.json: a count store of {both}; re-run with --overwr"):
        run_stage("collect", exp(), out)
    with pytest.raises(StaleResultError, match=f"{both}; count the records again"):
        run_stage("identify", exp(), out)


def test_results_of_another_method_version_are_refused(done, tmp_path, monkeypatch):
    """A bump of METHOD_VERSION (a fix that changes what a stage computes) refuses every result
    made before it; version 1 is absent from the fingerprints, so results made before it existed
    (version 1) match the current code's."""
    import shutil

    from sparcom_jax import fingerprint
    from sparcom_jax.data import default_tokenizer, load_instructions
    from sparcom_jax.pipeline.provenance import collect_fingerprint

    out = tmp_path / "out"
    shutil.copytree(done, out)
    cfg, recs = exp(), load_instructions(n_per_category=1)

    def fingerprints():
        return [collect_fingerprint(cfg, cfg.base, recs, "plain")[0],
                stages.ablation_fingerprint(cfg, cfg.finetuned, recs, "neurons", {}),
                stages.train_fingerprint("b", stages.train_config(cfg), recs, default_tokenizer()),
                stages._analysis_fingerprint(cfg, stages.Analyses({}, {}), True)]

    assert not any("method" in fp for fp in fingerprints())
    monkeypatch.setattr(fingerprint, "METHOD_VERSION", 2)
    assert [fp["method"] for fp in fingerprints()] == [2, 2, 2, 2]
    no_weights(monkeypatch)
    for stage in ("collect", "report"):
        with pytest.raises(StaleResultError, match=r"method version \(sparcom_jax.fingerprint.METHOD_VERSION.*: unset -> 2"):
            run_stage(stage, cfg, out)


def test_overwrite_recomputes_with_the_new_settings(tmp_path):
    out = tmp_path / "o"
    run_stage("collect", exp(), out)
    with pytest.raises(StaleResultError):
        run_stage("collect", exp("data.max_length=40"), out)
    run_stage("collect", exp("data.max_length=40"), out, overwrite=True)
    meta = json.loads((out / "counts" / "base" / "meta.json").read_text())
    assert meta["fingerprint"]["max_length"] == 40 and meta["meta"]["max_length"] == 40
    run_stage("collect", exp("data.max_length=40"), out)  # now it matches: reused


def test_a_resumed_collection_says_so(tmp_path, capfd):
    out = tmp_path / "o"
    run_stage("collect", exp(), out)
    store = out / "counts" / "tuned"
    # as a run stopped (Ctrl-C, kill) before the store's only chunk was written leaves it
    (store / "progress.json").write_text('{"done_chunks": 0}')
    with pytest.raises(ValueError, match=r"counts/tuned: the collection that writes this store has not finished"):
        run_stage("identify", exp(), out)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    _hold(out, int(dead.stdout))  # a killed run leaves its lock
    capfd.readouterr()
    run_stage("collect", exp(), out)
    err = capfd.readouterr().err
    assert f"{out}: an earlier run (pid {int(dead.stdout)}, started " in err
    assert "stopped without finishing; its finished work is checked and reused, the rest is resumed or redone" in err
    assert "collect [1/3] base: already complete with the same settings" in err
    assert (f"collect [2/3] tuned: an earlier collection into {store} stopped before it finished a chunk (no "
            "record counted); counting from the start") in err
    assert json.loads((store / "progress.json").read_text())["done_chunks"] == 1


def test_stages_refuse_to_analyse_the_base_alone_while_fine_tuning_is_unfinished(tmp_path, monkeypatch):
    # `sparcom finetune` stopped before it wrote checkpoints/series.json: `sparcom collect` counted
    # the base model alone (1 of 1) and identify/evaluate went on with it, without a word.
    from sparcom_jax.config import ConfigError
    from sparcom_jax.fingerprint import write_fingerprint
    from sparcom_jax.pipeline.common import model_list

    no_weights(monkeypatch)
    out = tmp_path / "o"
    write_fingerprint(out / "train", "finetune", {"train": "settings"})  # what finetune writes before any step
    cfg = exp("finetuned=null")
    for stage in ("collect", "identify"):
        with pytest.raises(ConfigError, match=r"o/train: the fine-tuning run here has not finished \(no .*"
                                              r"checkpoints/series\.json.*run `sparcom finetune` with the same"):
            run_stage(stage, cfg, out)
    assert not (out / "counts").exists()
    # `sparcom run` fine-tunes first: for it the unfinished run is the one it resumes
    assert [s.label for s in model_list(cfg, out, finetune_pending=True)] == ["base"]


def _tiny_model_and_records():
    import sparcom_jax as sj
    from sparcom_jax.models.config import ModelConfig
    from sparcom_jax.pipeline.common import with_vocab

    tok = sj.default_tokenizer()
    model = sj.init_model(ModelConfig.from_hf_config(with_vocab(TINY_ARCH, tok)), seed=0)
    model.tokenizer = tok
    return model, sj.load_instructions(n_per_category=2)


def test_an_interrupted_store_is_never_completed_with_other_settings(tmp_path):
    import sparcom_jax as sj

    model, recs = _tiny_model_and_records()
    out = tmp_path / "store"
    kw = dict(template="plain", max_length=48, batch_size=4, chunk_rows=4, progress=False, out=out)
    with pytest.raises(KeyboardInterrupt):
        sj.collect_instructions(model, recs, scope="prompt", _stop_after_chunks=1, **kw)
    assert json.loads((out / "progress.json").read_text())["done_chunks"] == 1
    with pytest.raises(StaleResultError, match=r"scope: 'prompt' -> 'all'"):
        sj.collect_instructions(model, recs, scope="all", **kw)
    assert not (out / LOCK_NAME).exists()  # a refused run leaves no lock behind
    # overwrite: every row is recounted with the new scope (no mixture of the two)
    redone = sj.collect_instructions(model, recs, scope="all", overwrite=True, **kw)
    fresh = sj.collect_instructions(model, recs, scope="all", template="plain", max_length=48, batch_size=4,
                                    progress=False)
    np.testing.assert_array_equal(redone.neuron_active[:], fresh.neuron_active)
    np.testing.assert_array_equal(redone.tokens[:], fresh.tokens)
    assert redone.meta["scope"] == "all" and redone.meta["fingerprint"]["scope"] == "all"


def test_a_store_stopped_before_its_first_chunk_makes_way_for_other_settings(tmp_path, capfd):
    """A collection stopped before any chunk was finished (Ctrl-C, or its first chunk failed) left a
    store that holds no counts, yet the rerun with other settings (the fix of what failed) was
    refused with "--overwrite". It now starts afresh and says what changed; the result is what a
    fresh collection with the new settings gives."""
    import sparcom_jax as sj

    model, recs = _tiny_model_and_records()
    out = tmp_path / "store"
    kw = dict(template="plain", max_length=48, batch_size=4, chunk_rows=4, progress=False, out=out)
    with pytest.raises(KeyboardInterrupt):
        sj.collect_instructions(model, recs, scope="prompt", _stop_after_chunks=0, **kw)
    assert json.loads((out / "progress.json").read_text())["done_chunks"] == 0 and (out / "meta.json").is_file()
    capfd.readouterr()
    redone = sj.collect_instructions(model, recs, scope="all", **kw)
    assert "scope: 'prompt' -> 'all'" in capfd.readouterr().err
    fresh = sj.collect_instructions(model, recs, scope="all", template="plain", max_length=48, batch_size=4,
                                    progress=False)
    np.testing.assert_array_equal(redone.neuron_active[:], fresh.neuron_active)
    assert redone.meta["fingerprint"]["scope"] == "all" and not (out / LOCK_NAME).exists()


@pytest.mark.parametrize("finished", [0, 1])
def test_collect_reruns_over_an_unstarted_store_but_not_over_finished_chunks(tmp_path, monkeypatch, capfd,
                                                                            finished):
    """The pipeline's own check refused the unstarted store before the store was opened. A store
    with a finished chunk made with other settings is still refused, naming the setting, and
    resumed with the same settings."""
    from sparcom_jax.stats import collect

    real, stop = collect.collect_instructions, [finished]

    def chunked(*a, **k):  # chunks of 4 records (of 12); the first run stops after `finished` of them
        return real(*a, **k, chunk_rows=4, _stop_after_chunks=stop.pop() if stop else None)

    out = tmp_path / "o"
    monkeypatch.setattr(collect, "collect_instructions", chunked)  # imported by the stage when it runs
    with pytest.raises(KeyboardInterrupt):
        run_stage("collect", exp(), out)
    store = out / "counts" / "base"
    assert json.loads((store / "progress.json").read_text())["done_chunks"] == finished
    if finished:
        with pytest.raises(StaleResultError, match=r"data.max_length: 48 -> 40.*--overwrite"):
            run_stage("collect", exp("data.max_length=40"), out)
        capfd.readouterr()
        run_stage("collect", exp(), out)
        assert (f"collect [1/3] base: an earlier collection into {store} stopped before it finished (4 of 12 "
                "records counted); resuming it with the same settings") in capfd.readouterr().err
        return
    run_stage("collect", exp("data.max_length=40"), out)
    meta = json.loads((store / "meta.json").read_text())
    assert meta["fingerprint"]["max_length"] == 40 and json.loads((store / "progress.json").read_text()) == {
        "done_chunks": 3}


@pytest.fixture
def live_pid():
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield p.pid
    p.kill()
    p.wait()


def _hold(directory, pid, host=None):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / LOCK_NAME).write_text(json.dumps({"pid": pid, "host": host or socket.gethostname(),
                                                   "started": 0, "command": "sparcom collect"}))


def test_a_store_being_written_by_another_live_process_is_refused(tmp_path, live_pid):
    out = tmp_path / "o"
    _hold(out / "counts" / "base", live_pid)
    with pytest.raises(LockedError, match=rf"pid {live_pid} on host {socket.gethostname()}.*choose another"):
        run_stage("collect", exp(), out)
    assert not (out / "counts" / "base" / "meta.json").exists()


def test_the_output_directory_is_locked_while_a_stage_runs(tmp_path, live_pid):
    _hold(tmp_path / "o", live_pid)
    with pytest.raises(LockedError, match="output directory"):
        run_stage("identify", exp(), tmp_path / "o")


def test_lock_left_by_a_dead_process_or_another_host(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    _hold(tmp_path / "a", int(dead.stdout))
    with DirLock(tmp_path / "a") as lock:  # a dead holder on this host: taken over
        assert lock.stale_taken["pid"] == int(dead.stdout)
        assert json.loads((tmp_path / "a" / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert not (tmp_path / "a" / LOCK_NAME).exists()
    _hold(tmp_path / "b", int(dead.stdout), host="another-host")
    with pytest.raises(LockedError, match="another-host"):  # cannot be checked from here: never taken
        DirLock(tmp_path / "b").acquire()
    with DirLock(tmp_path / "c"):
        with pytest.raises(LockedError):  # held by this very process
            DirLock(tmp_path / "c").acquire()


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """An output directory where `finetune` ran."""
    out = tmp_path_factory.mktemp("ft") / "out"
    cfg = {**EXP, "finetuned": None, "train_data": {"n_per_category": 2},
           "train": {"total_steps": 2, "save_every": 1, "batch_size": 4, "warmup_steps": 0, "max_length": 48,
                     "buckets": [48], "async_checkpointing": False, "allow_cut_responses": True}}
    run_stage("finetune", from_dict(ExperimentConfig, cfg, "test"), out)
    return out, cfg


@pytest.mark.parametrize("override,named", [
    ("train.learning_rate=0.01", "train settings changed"),
    ("train_data.n_per_category=1", "records"),
    ("data.split_seed=4", "records"),
    ("base.seed=3", "base model weights changed"),
])
def test_finetune_refuses_a_run_made_with_other_settings(tuned, override, named, monkeypatch):
    out, cfg = tuned
    no_weights(monkeypatch)
    with pytest.raises(StaleResultError) as e:
        run_stage("finetune", apply_overrides(from_dict(ExperimentConfig, cfg, "t"), [override]), out)
    assert named in str(e.value) and "--overwrite" in str(e.value)


@pytest.mark.parametrize("override,named", [
    ("train.learning_rate=0.01", "train settings changed (learning_rate: 0.0003 -> 0.01)"),
    ("base.seed=3", "base model weights changed"),
])
def test_stages_refuse_checkpoints_fine_tuned_with_other_settings(tuned, override, named, monkeypatch):
    # `sparcom collect` after a train setting or the base model changed analysed the checkpoints
    # of the earlier fine-tuning (only their records were checked) and saved the new settings
    # as OUT/config.yaml: "after" was not tuned from "before" as the config says.
    out, cfg = tuned
    no_weights(monkeypatch)
    saved = (out / "config.yaml").read_text()
    with pytest.raises(StaleResultError) as e:
        run_stage("collect", apply_overrides(from_dict(ExperimentConfig, cfg, "t"), [override]), out)
    assert named in str(e.value) and "sparcom finetune --overwrite" in str(e.value) and "\n" not in str(e.value)
    assert (out / "config.yaml").read_text() == saved
    stages.preflight("collect", from_dict(ExperimentConfig, cfg, "t"), out)  # unchanged: no refusal


def test_a_refused_fine_tuning_run_names_the_records_whose_text_changed(tuned, monkeypatch):
    import dataclasses

    out, cfg = tuned
    no_weights(monkeypatch)
    real = stages.train_records
    r = real(from_dict(ExperimentConfig, cfg, "t"))[2]

    def edited(c):
        return [dataclasses.replace(x, instruction="Please: " + x.instruction) if x.id == r.id else x
                for x in real(c)]

    monkeypatch.setattr(stages, "train_records", edited)
    n = len(real(from_dict(ExperimentConfig, cfg, "t")))
    named = rf"tokenized text \(tokenizer or record text\) changed \(1 of {n} records: '{r.id}' \({r.category}\)\)"
    for stage in ("finetune", "collect"):
        with pytest.raises(StaleResultError, match=named):
            run_stage(stage, from_dict(ExperimentConfig, cfg, "t"), out)


def test_finetune_refuses_records_cut_before_their_response_before_writing_the_run(tmp_path, monkeypatch):
    """Refused before OUT/train is written: a fingerprint written first would then have asked a
    user who raised max_length, as the refusal says, for --overwrite."""
    no_weights(monkeypatch)
    cfg = {**EXP, "finetuned": None, "train_data": {"n_per_category": 2}, "train": {"max_length": 48}}
    with pytest.raises(TrainConfigError, match=r"max_length=48 cuts 4 of 12 training records .*allow_cut_responses"):
        run_stage("finetune", from_dict(ExperimentConfig, cfg, "test"), tmp_path / "out")
    assert not (tmp_path / "out" / "train").exists()


def test_finetune_rerun_with_the_same_settings_keeps_the_exports(tuned, monkeypatch):
    out, cfg = tuned
    weights = out / "checkpoints" / "base-ft" / "hf" / "model.safetensors"
    before = weights.stat().st_mtime_ns
    named = counted(monkeypatch, "_run_token_changes")  # looked for only when a run is refused
    run_stage("finetune", from_dict(ExperimentConfig, cfg, "t"), out)
    stages.check_checkpoints_current(from_dict(ExperimentConfig, cfg, "t"), out)
    assert named == []
    assert weights.stat().st_mtime_ns == before  # not re-exported: collect's fingerprint stays valid
    series = json.loads((out / "checkpoints" / "series.json").read_text())
    assert [(d["name"], d["step"]) for d in series] == [("base-ft-step1", 1), ("base-ft", 2)]


def test_precision_check_reports_each_precisions_set_agreement(tmp_path):
    from sparcom_jax.analysis import identify
    from sparcom_jax.categories import CATEGORIES
    from sparcom_jax.pipeline.stages import analyze_all, precision_agreement
    from sparcom_jax.stats.store import open_counts

    cfg = exp("collect.precision_check=true", "finetuned.template=plain")
    out = tmp_path / "o"
    run_stage("collect", cfg, out)
    stores = sorted(p.name for p in (out / "counts").iterdir())
    assert stores == ["base", "tuned", "tuned_in_bfloat16", "tuned_in_bfloat16_with_float32_gate_and_weights"]
    meta = json.loads((out / "counts" / "tuned_in_bfloat16" / "meta.json").read_text())
    assert meta["fingerprint"]["dtype"] == "bfloat16" and "gate_dtype" not in meta["fingerprint"]
    gated = json.loads((out / "counts" / "tuned_in_bfloat16_with_float32_gate_and_weights" / "meta.json").read_text())
    assert gated["fingerprint"]["gate_dtype"] == "float32" and gated["meta"]["gate_dtype"] == "float32"
    an = analyze_all(cfg, out, full=False)
    prec = precision_agreement(cfg, an)
    rule = cfg.identify.to_rule()
    ref = identify(open_counts(out / "counts" / "tuned"), "neuron_active", rule).category_sets
    bf = identify(open_counts(out / "counts" / "tuned_in_bfloat16"), "neuron_active", rule).category_sets
    for i, c in enumerate(CATEGORIES):  # brute force: |A & B| / |A | B| of the category sets
        a, b = ref[i].ravel(), bf[i].ravel()
        assert prec["isn bfloat16"][c] == pytest.approx((a & b).sum() / (a | b).sum())
    assert set(prec) == {"isn bfloat16", "isn bfloat16 with float32 gate and weights", "reference", "note"}
    # the study's own precision is the reference's, never compared with itself
    assert "float32" in prec["reference"] and "isn float32" not in prec


def test_collect_fingerprint_covers_the_record_labels():
    """Relabelled records (same ids and text, another category or source) regroup the counts:
    counts made under the old labels must not be reused."""
    import dataclasses

    from sparcom_jax.data import load_instructions
    from sparcom_jax.pipeline.provenance import collect_fingerprint

    cfg = exp()
    recs = load_instructions(n_per_category=1)
    fp, _ = collect_fingerprint(cfg, cfg.base, recs, "plain")
    swapped = [dataclasses.replace(r, category=recs[1 - i].category) for i, r in enumerate(recs[:2])] + recs[2:]
    resourced = [dataclasses.replace(recs[0], source="generated-again"), *recs[1:]]
    for relabelled in (swapped, resourced):
        assert collect_fingerprint(cfg, cfg.base, relabelled, "plain")[0]["records"] != fp["records"]


def test_a_store_serves_a_run_by_its_activation_sums_only_when_it_holds_them():
    """`served_by`: a store with the sums serves a run without them (fingerprinted as made, with
    them); a store without them, or no store at all, leaves the run's fingerprint as asked, so a
    new collection counts no sums nobody asked for and a run that asks for them is refused."""
    from sparcom_jax.fingerprint import served_by
    from sparcom_jax.pipeline.provenance import stale

    without, with_sums = {"model": "m", "sums": False}, {"model": "m", "sums": True}
    assert served_by(without, None) == without
    assert served_by(without, {"model": "m", "sums": False}) == without
    assert served_by(without, with_sums) == with_sums
    assert served_by(with_sums, without) == with_sums
    assert not stale("OUT/counts/m", with_sums, served_by(without, with_sums), overwrite=False)
    with pytest.raises(StaleResultError, match=r"collect\.sums"):
        stale("OUT/counts/m", without, served_by(with_sums, without), overwrite=False)


def test_the_stores_of_a_multi_process_run_hash_the_weights_once(tmp_path, monkeypatch):
    """open_model_counts checks each process's store against its share's fingerprint; each check
    hashed every weights file again: with the digest cache off (or unwritable), P times per model,
    on every process."""
    import sparcom_jax as sj
    from sparcom_jax import fingerprint
    from sparcom_jax.data import default_tokenizer
    from sparcom_jax.pipeline.common import counts_root, group_records, identify_records
    from sparcom_jax.pipeline.provenance import collect_fingerprint

    monkeypatch.setenv(fingerprint.DIGEST_CACHE_ENV, "off")
    model = stages.load_spec_model(exp().base)
    sj.save_model(model, tmp_path / "m", tokenizer=default_tokenizer())
    cfg = exp(f"base={{name: base, path: {tmp_path / 'm'}, template: plain}}", "finetuned=null")
    records, out = identify_records(cfg), tmp_path / "out"
    caps, groups = stages.study_content_caps(cfg, out), group_records(cfg, records)
    for k in range(2):  # what process k of 2 writes (collect_stage): its share of the records, in process_<k>
        fp, _ = collect_fingerprint(cfg, cfg.base, records[k::2], "plain", content_caps=caps)
        sj.collect_instructions(model, records[k::2], default_tokenizer(), template="plain", scope=cfg.data.scope,
                                max_length=cfg.data.max_length, out=counts_root(cfg, out) / "base" / f"process_{k}",
                                progress=False, buckets=cfg.collect.buckets, sums=cfg.collect.sums, fingerprint=fp,
                                content_caps=caps, groups=groups[k::2])
    hashed, sha256 = [], fingerprint.file_sha256
    monkeypatch.setattr(fingerprint, "file_sha256", lambda path: hashed.append(Path(path).name) or sha256(path))
    counts = stages.open_model_counts(cfg, out, cfg.base, content_caps=caps)
    assert sorted(hashed) == ["config.json", "model.safetensors"]
    assert counts.ids == [r.id for r in records]


def test_ablation_fingerprint_covers_the_held_out_records_text_and_labels():
    """The causal check's loss is measured on the held-out records' responses, per category:
    an edited response or category under the same id must not reuse the stored result."""
    import dataclasses

    from sparcom_jax.data import load_instructions
    from sparcom_jax.pipeline.stages import ablation_fingerprint

    cfg = exp()
    recs = load_instructions(n_per_category=1)
    fp = ablation_fingerprint(cfg, cfg.finetuned, recs, "neurons", {})
    edits = [dict(output="another reference response"), dict(instruction="another instruction"),
             dict(input="another input"), dict(category=recs[1].category)]
    for edit in edits:
        changed = [dataclasses.replace(recs[0], **edit), *recs[1:]]
        assert ablation_fingerprint(cfg, cfg.finetuned, changed, "neurons", {})["records"] != fp["records"], edit


def test_the_mass_matched_control_is_fingerprinted_for_experts_only():
    """An experts result stored without the mass-matched control lacks it: refused while it is
    on (the default), reused when it is off; neurons' results do not depend on it."""
    from sparcom_jax.data import load_instructions
    from sparcom_jax.pipeline.stages import _as_compared, ablation_fingerprint

    recs = load_instructions(n_per_category=1)
    on, off = exp(), exp("ablation.mass_matched=false")
    assert on.ablation.mass_matched and not off.ablation.mass_matched
    fp_on, fp_off = ({k: ablation_fingerprint(c, c.finetuned, recs, k, {}) for k in ("neurons", "experts")}
                     for c in (on, off))
    assert fp_on["experts"]["ablation"] == {**fp_off["experts"]["ablation"],
                                            "mass_matched": "measured_set_mass/unbiased_fill"}
    assert _as_compared(fp_on["experts"]) != _as_compared(fp_off["experts"])
    # Results of the earlier rules are refused: draws matched to the set's unablated estimate
    # (True), then to its measured mass by the closest prefix of a random order.
    for earlier in (True, "measured_set_mass"):
        old = {**fp_on["experts"], "ablation": {**fp_on["experts"]["ablation"], "mass_matched": earlier}}
        assert _as_compared(old) != _as_compared(fp_on["experts"])
    assert _as_compared(fp_on["neurons"]) == _as_compared(fp_off["neurons"])
    # (the neurons' entry is their own control's, `ablation.neuron_mass_matched`)
    assert fp_on["neurons"]["ablation"]["mass_matched"] == fp_off["neurons"]["ablation"]["mass_matched"]


def test_the_neurons_firing_mass_control_is_fingerprinted_with_its_categories():
    """A neurons or expert-neurons result made under another `ablation.neuron_mass_matched` is
    refused (another control, or the same for other categories); "never" leaves the
    fingerprint as it was before the control existed, so those results still match; the
    experts' fingerprint does not depend on it."""
    from sparcom_jax.data import load_instructions
    from sparcom_jax.pipeline.stages import _as_compared, ablation_fingerprint

    recs = load_instructions(n_per_category=1)
    modes = ("always", "where_warned", "never")
    assert exp().ablation.neuron_mass_matched == "always"
    fps = {m: {k: _as_compared(ablation_fingerprint(c, c.finetuned, recs, k, {}))
               for k in ("neurons", "expert_neurons", "experts")}
           for m, c in ((m, exp(f"ablation.neuron_mass_matched={m}")) for m in modes)}
    for kind in ("neurons", "expert_neurons"):
        got = [fps[m][kind] for m in modes]
        assert all(x != y for i, x in enumerate(got) for y in got[i + 1:]), kind
        assert "mass_matched" not in fps["never"][kind]["ablation"]
        assert {fps[m][kind]["ablation"]["mass_matched"] for m in modes[:2]} == {
            f"held_out_firing/unbiased_fill/{m}" for m in modes[:2]}
    assert fps["always"]["experts"] == fps["never"]["experts"] == fps["where_warned"]["experts"]


def test_the_firing_mass_source_is_fingerprinted_and_the_identification_source_keeps_older_results():
    """`ablation.neuron_mass_source`: a result whose firing was counted on the other records is
    refused; "identification" gives the fingerprint results had before the source was chosen (they
    counted it there), so they still match under it; "never" and the experts do not depend on it."""
    from sparcom_jax.data import load_instructions
    from sparcom_jax.pipeline.stages import _as_compared, ablation_fingerprint

    recs = load_instructions(n_per_category=1)
    assert exp().ablation.neuron_mass_source == "held_out"

    def fp(kind, *over):
        c = exp(*over)
        return _as_compared(ablation_fingerprint(c, c.finetuned, recs, kind, {}))

    for kind in ("neurons", "expert_neurons"):
        held, ident = fp(kind), fp(kind, "ablation.neuron_mass_source=identification")
        assert held != ident
        assert ident["ablation"]["mass_matched"] == "identification_firing/unbiased_fill/always"  # (as before)
        assert fp(kind, "ablation.neuron_mass_matched=never") == fp(
            kind, "ablation.neuron_mass_matched=never", "ablation.neuron_mass_source=identification")
    assert fp("experts") == fp("experts", "ablation.neuron_mass_source=identification")


def held_out_firing(shape, seed=7):
    """{category: float `shape`}: a firing on the held-out records no identification gives."""
    from sparcom_jax.categories import CATEGORIES

    rng = np.random.default_rng(seed)
    return {c: rng.random(shape) * 0.3 for c in CATEGORIES}


def test_the_ablate_stage_runs_the_neurons_firing_mass_control(done, tmp_path, monkeypatch):
    """ablation.neuron_mass_matched=always: the stage draws the firing-mass-matched sets from the
    firing its baseline pass counts on the held-out records (data.scope; outside each set), runs them
    in the one round it counts, stores them under mass_matched and refuses to reuse the result once
    the setting changes."""
    import shutil

    import sparcom_jax.stats.losses as losses
    from sparcom_jax.categories import CATEGORIES
    from sparcom_jax.stats.losses import ablation_shape

    calls, ends, scopes = [], [], []
    firing, magnitude = {}, {}

    def make_loss_fn(model, records, tok=None, **kw):
        scopes.append(kw["firing_scope"])
        firing.update(held_out_firing(ablation_shape(model.config, kw["kind"])))
        magnitude.update(held_out_firing(ablation_shape(model.config, kw["kind"]), seed=8))

        def loss(mask):
            calls.append(mask)
            loss.last_unit_firing = firing if mask is None else None  # (the baseline pass counts it)
            loss.last_unit_magnitude = magnitude if mask is None else None  # (and the magnitude beside it)
            return {c: 1.0 + (0 if mask is None else float(np.sum(mask))) for c in CATEGORIES}
        loss.firing_records = counted  # (known from the scopes: every process has it)
        return loss

    counted = {c: 4 + i for i, c in enumerate(CATEGORIES)}

    class Counting(stages._Counting):
        def __exit__(self, *exc):
            ends.append((self.bar.n, self.bar.total))
            super().__exit__(*exc)

    monkeypatch.setattr(losses, "make_loss_fn", make_loss_fn)
    monkeypatch.setattr(stages, "_Counting", Counting)
    out = tmp_path / "out"
    shutil.copytree(done, out)
    cfg = exp("ablation.neuron_mass_matched=always", "ablation.n_random=2")
    res = stages.ablate_stage(cfg, out, overwrite=True)["_results"][("tuned", "neurons")]
    ident = stages.analyze_all(cfg, out, full=False).models["tuned"]["isn"].ident
    with_set = [a for a, c in enumerate(CATEGORIES) if ident.category_sets[a].any()]
    # per category: its set, 2 frequency-matched, 2 firing-mass-matched and 2 magnitude-matched draws
    # (ablation.neuron_magnitude_matched: always, the default)
    assert with_set and len(calls) == 1 + len(with_set) * (1 + 3 * 2)
    assert ends == [(len(calls), len(calls))] and scopes == [cfg.data.scope]
    assert calls[0] is None  # the baseline pass first: it counts the firing
    for a in with_set:
        s = ident.category_sets[a]
        np.testing.assert_allclose(res.set_category_mass[a], firing[CATEGORIES[a]][s].sum(), rtol=1e-12)
        # (shared by process 0 behind the firing: each category's own, not swapped with the firing)
        np.testing.assert_allclose(res.magnitude()["set"][a], magnitude[CATEGORIES[a]][s].sum(), rtol=1e-12)
        assert not np.isclose(res.set_category_mass[a], ident.category_mean[a][s].sum())
        assert np.isfinite(res.mass_random_draws[:, a]).all()
    for m in calls[1:]:  # the mass- and magnitude-matched draws: the last four masks of each category
        assert m is not None
    per_cat = [calls[1 + i * 7:1 + (i + 1) * 7] for i in range(len(with_set))]
    for a, masks in zip(with_set, per_cat):
        assert all(not (m & ident.category_sets[a]).any() for m in masks[3:])
        np.testing.assert_allclose(res.magnitude_random_layer_magnitude[:, a],
                                   [(magnitude[CATEGORIES[a]] * m).sum(1) for m in masks[5:]], rtol=1e-12)
    stored = json.loads((out / "ablate" / "tuned_neurons.json").read_text())
    assert stored["mass_matched"]["where"] == "always" and stored["mass_matched"]["mass"] == "firing"
    assert stored["mass_matched"]["source"] == "held_out"
    assert stored["mass_matched"]["firing_records"] == counted == res.firing_records  # (through `_Counting`)
    assert stored["mass_matched"]["magnitude"]["set"] == pytest.approx(
        {c: float(v) for c, v in zip(CATEGORIES, res.magnitude()["set"])}, nan_ok=True)
    # A result stored before the magnitude was kept: reused as not measured; --overwrite measures it.
    del stored["mass_matched"]["magnitude"]
    (out / "ablate" / "tuned_neurons.json").write_text(json.dumps(stored))
    n = len(calls)
    old = stages.ablate_stage(cfg, out)["_results"][("tuned", "neurons")]
    assert len(calls) == n and old.magnitude() is None
    again = stages.ablate_stage(cfg, out, overwrite=True)["_results"][("tuned", "neurons")]
    assert len(calls) == 2 * n and again.magnitude() is not None
    np.testing.assert_array_equal(again.magnitude()["set"], res.magnitude()["set"])
    # Measured: --overwrite reuses it as any result of the same settings.
    assert stages.ablate_stage(cfg, out, overwrite=True)["_results"][("tuned", "neurons")].magnitude() is not None
    assert len(calls) == 2 * n
    with pytest.raises(StaleResultError, match="neuron_mass_matched|mass_matched"):
        run_stage("ablate", exp("ablation.neuron_mass_matched=never", "ablation.n_random=2"), out)
    # A result without the magnitude-matched draws is not served to settings that ask for them.
    without = exp("ablation.neuron_magnitude_matched=never", "ablation.n_random=2")
    with pytest.raises(StaleResultError, match="magnitude_matched"):
        run_stage("ablate", without, out)
    n = len(calls)
    assert stages.ablate_stage(without, out, overwrite=True)["_results"][("tuned", "neurons")].magnitude_matched() is None
    assert len(calls) == n + 1 + len(with_set) * (1 + 2 * 2)  # (no magnitude-matched passes)
    with pytest.raises(StaleResultError, match="magnitude_matched"):
        run_stage("ablate", cfg, out)


def test_the_magnitude_matched_control_is_fingerprinted_where_it_runs():
    """`ablation.neuron_magnitude_matched`: each mode its own fingerprint for neurons and expert neurons;
    absent where the control does not run ("never", no firing-mass-matched control on the held-out
    records, no draws), so results made before it existed match those settings; experts unaffected."""
    from sparcom_jax.data import load_instructions
    from sparcom_jax.pipeline.stages import MAGNITUDE_RULE, _as_compared, ablation_fingerprint

    recs = load_instructions(n_per_category=1)
    assert exp().ablation.neuron_magnitude_matched == "always"

    def fp(kind, *over):
        c = exp(*over)
        return _as_compared(ablation_fingerprint(c, c.finetuned, recs, kind, {}))["ablation"]

    for kind in ("neurons", "expert_neurons"):
        got = {m: fp(kind, f"ablation.neuron_magnitude_matched={m}") for m in ("always", "where_warned", "never")}
        assert got["always"]["magnitude_matched"] == f"{MAGNITUDE_RULE}/always"
        assert got["where_warned"]["magnitude_matched"] == f"{MAGNITUDE_RULE}/where_warned"
        assert "magnitude_matched" not in got["never"]
        assert {k: v for k, v in got["always"].items() if k != "magnitude_matched"} == got["never"]
        for off in ("ablation.neuron_mass_matched=never", "ablation.neuron_mass_source=identification",
                    "ablation.n_random=0"):
            assert "magnitude_matched" not in fp(kind, off), off
    assert fp("experts") == fp("experts", "ablation.neuron_magnitude_matched=never")


def test_an_edited_records_file_is_read_again_in_the_same_process(tmp_path):
    """The records are cached between stages of one process (a notebook, `run`): an edit of
    the file must reach the next stage, not the records (and fingerprints) of before."""
    import dataclasses

    from sparcom_jax.data import load_instructions
    from sparcom_jax.pipeline.common import identify_records

    recs = load_instructions()
    f = tmp_path / "records.jsonl"
    f.write_text("".join(json.dumps(dataclasses.asdict(r)) + "\n" for r in recs))
    cfg = exp(f"data.path={f}")
    first = identify_records(cfg)[0]
    f.write_text("".join(json.dumps(dataclasses.asdict(dataclasses.replace(r, output=r.output + " (edited)"))) + "\n"
                         for r in recs))
    again = identify_records(cfg)[0]
    assert again.id == first.id and again.output == first.output + " (edited)"


def test_a_same_size_edit_with_its_time_restored_is_read_again_in_the_same_process(tmp_path):
    # The cache was keyed by size and mtime: a category relabelled in place ("math" -> "code")
    # by a tool that keeps times (tar, rsync -t, cp -p) kept the old records, and so the old
    # fingerprints: collect called counts of the old labels current.
    from sparcom_jax.pipeline.common import identify_records

    f = tmp_path / "records.jsonl"
    rows = [{"id": f"r{i}", "category": c, "instruction": f"Do thing {i}.", "output": "Done."}
            for i, c in enumerate(["math", "code"] * 6)]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = exp(f"data.path={f}", "data.split=null", "data.n_per_category=null")
    assert identify_records(cfg)[0].category == "math"
    st = f.stat()
    f.write_text(f.read_text().replace('"math"', '"code"', 1))
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert f.stat().st_size == st.st_size and f.stat().st_mtime_ns == st.st_mtime_ns
    assert identify_records(cfg)[0].category == "code"


def test_a_new_run_in_a_removed_run_directory_exports_its_own_checkpoints(tuned, tmp_path):
    """Removing OUT/train by hand and fine-tuning again (here from another base) writes a
    run.json equal to the old one: the old exports must not pass for the new run's."""
    import hashlib
    import shutil

    src, cfg = tuned
    out = tmp_path / "out"
    shutil.copytree(src, out)
    shutil.rmtree(out / "train")
    weights = out / "checkpoints" / "base-ft" / "hf" / "model.safetensors"
    old = hashlib.sha256(weights.read_bytes()).hexdigest()
    run_stage("finetune", apply_overrides(from_dict(ExperimentConfig, cfg, "t"), ["base.seed=3"]), out)
    assert hashlib.sha256(weights.read_bytes()).hexdigest() != old


def test_outputs_a_rerun_no_longer_makes_leave_the_stage_directory(done, tmp_path, monkeypatch):
    """identify, evaluate, compare and report record the fingerprint of what they computed now:
    files of an earlier run (a model or control left out since, made with other settings) must not stay."""
    import shutil

    no_weights(monkeypatch)
    out = tmp_path / "out"
    shutil.copytree(done, out)
    assert (out / "compare" / "same_template.json").is_file() and (out / "evaluate" / "tuned.json").is_file()
    run_stage("compare", exp("collect.template_control=false", "identify.eps=0.1"), out)
    assert sorted(p.name for p in (out / "compare").iterdir()) == ["comparison.json", "fingerprint.json"]
    assert any("tuned" in p.name for p in (out / "report").rglob("*"))
    for stage in ("identify", "evaluate", "report"):
        run_stage(stage, exp("finetuned=null"), out)
    assert sorted(p.name for p in (out / "identify").iterdir()) == ["base", "fingerprint.json"]
    assert sorted(p.name for p in (out / "evaluate").iterdir()) == ["base.json", "fingerprint.json"]
    assert not [p for p in (out / "report").rglob("*") if "tuned" in p.name]


def test_identify_leaves_no_set_list_of_an_earlier_run_in_a_models_directory(done, tmp_path, monkeypatch):
    """identify writes one directory per model: the lists of a section an earlier run made there (the
    ISEs of an MoE model since replaced under the same name) stayed beside the new ones, under a
    fingerprint that vouched for them."""
    import shutil

    no_weights(monkeypatch)
    out = tmp_path / "out"
    shutil.copytree(done, out)
    made = sorted(p.name for p in (out / "identify" / "base").iterdir())
    (out / "identify" / "base" / "ise.json").write_text("{}")
    run_stage("identify", exp(), out)
    assert sorted(p.name for p in (out / "identify" / "base").iterdir()) == made


def test_counts_made_with_other_content_caps_are_refused():
    # The caps depend on every model and template of the study, not on this store's own
    # settings: a store counted with other caps counted other tokens and must not be reused.
    from sparcom_jax.pipeline.common import identify_records
    from sparcom_jax.pipeline.provenance import collect_fingerprint, stale

    cfg = exp()
    records = identify_records(cfg)
    caps = stages.study_content_caps(cfg, None)
    assert set(caps) == {r.id for r in records}
    fp, enc = collect_fingerprint(cfg, cfg.finetuned, records, "chat", content_caps=caps)
    assert [int(s.sum()) for s in enc.scopes] == [caps[r.id] for r in records]
    lower = dict(caps, **{records[0].id: caps[records[0].id] - 1})
    other, _ = collect_fingerprint(cfg, cfg.finetuned, records, "chat", content_caps=lower)
    with pytest.raises(StaleResultError, match=r"content caps \(instruction/input tokens counted per record"):
        stale("store", fp, other, overwrite=False)
    # Caps that cut nothing of a store (plain keeps the fewest content tokens here) leave its
    # fingerprint as it was without caps: stores counted before caps existed are reused.
    base, enc = collect_fingerprint(cfg, cfg.base, records, "plain", content_caps=caps)
    assert not enc.capped.any() and base == collect_fingerprint(cfg, cfg.base, records, "plain")[0]
    assert stages.study_content_caps(exp("data.scope=prompt"), None) is None


def test_a_report_that_fails_midway_leaves_the_earlier_report_whole(done, tmp_path, monkeypatch):
    import shutil

    import sparcom_jax.report as report

    no_weights(monkeypatch)
    out = tmp_path / "out"
    shutil.copytree(done, out)
    before = {p.relative_to(out / "report"): p.read_bytes() for p in (out / "report").rglob("*") if p.is_file()}
    assert Path("index.html") in before

    def interrupted(rdir, summary, **kw):  # e.g. Ctrl-C after the first file
        report.write_json(Path(rdir) / "summary.json", {"partial": True})
        raise KeyboardInterrupt

    monkeypatch.setattr(report, "write_report", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_stage("report", exp(), out)
    after = {p.relative_to(out / "report"): p.read_bytes() for p in (out / "report").rglob("*") if p.is_file()}
    assert after == before
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".report")) == []


@pytest.mark.parametrize("stage, module, writer", [("identify", "sparcom_jax.report.export", "export_sets"),
                                                   ("evaluate", "sparcom_jax.pipeline.stages", "write_json"),
                                                   ("compare", "sparcom_jax.pipeline.stages", "write_json")])
def test_an_analysis_stage_stopped_midway_leaves_no_fingerprint_vouching_for_its_files(
        done, tmp_path, monkeypatch, stage, module, writer):
    # Rewritten with identify.eps=0.1 and stopped after the first file (Ctrl-C, a full disk): that
    # file is new, the others are old, and the old fingerprint (eps 0.05) vouched for all of them.
    import importlib
    import shutil

    no_weights(monkeypatch)
    out = tmp_path / "out"
    shutil.copytree(done, out)
    assert (out / stage / "fingerprint.json").is_file()
    mod = importlib.import_module(module)
    real, calls = getattr(mod, writer), []

    def stopped(*a, **k):
        if calls:
            raise OSError(28, "No space left on device")
        calls.append(a)
        return real(*a, **k)

    monkeypatch.setattr(mod, writer, stopped)
    with pytest.raises(OSError):
        run_stage(stage, exp("identify.eps=0.1"), out)
    assert calls and not (out / stage / "fingerprint.json").exists()
    monkeypatch.setattr(mod, writer, real)
    run_stage(stage, exp("identify.eps=0.1"), out)  # a complete run seals it again
    fp = json.loads((out / stage / "fingerprint.json").read_text())["components"]
    assert fp["identify"]["eps"] == 0.1


TINY_MOE = dict(TINY_ARCH, model_type="mixtral", intermediate_size=48, num_local_experts=4, num_experts_per_tok=2)


def test_an_expert_ablation_skipped_on_overwrite_leaves_no_stale_result(tmp_path):
    """When the new sets cover every expert of a layer the expert ablation is skipped; the result
    an earlier run stored must go with it, or `sparcom report` refuses it and asks for the very
    `sparcom ablate --overwrite` that just ran (and left it there)."""
    moe = json.dumps(TINY_MOE)
    over = [f"base.init={moe}", f"finetuned.init={moe}", "ablation.kinds=[experts]", "ablation.n_random=0",
            "collect.template_control=false"]
    out = tmp_path / "out"
    run_stage("collect", exp(*over), out)
    f = out / "ablate" / "tuned_experts.json"
    assert "tuned_experts" in run_stage("ablate", exp(*over, "identify.eps_experts=0.1"), out)
    assert f.is_file()
    # eps_experts=1 selects every expert of a layer: routing would have nothing left, the kind is skipped
    assert "tuned_experts" not in run_stage("ablate", exp(*over, "identify.eps_experts=1"), out, overwrite=True)
    assert not f.exists()
    run_stage("report", exp(*over, "identify.eps_experts=1"), out)
    assert "ablation" not in json.loads((out / "report" / "summary.json").read_text())


def test_ablate_stage_switches_off_each_models_own_sets_on_the_held_out_records(done, tmp_path, monkeypatch):
    """With ablation.model=both each model gets the masks of its own identification (in the
    order ablation_matrix asks for them, so with the configured seed and bins), its own template,
    the "ablate" part of the records (disjoint from the identified ones) and the expert mode."""
    import shutil

    import sparcom_jax.stats.losses as losses
    from sparcom_jax.analysis.ablate import ablate_identification
    from sparcom_jax.categories import CATEGORIES
    from sparcom_jax.pipeline.common import ablate_records, identify_records
    from sparcom_jax.stats.losses import ablation_shape

    def recorder(masks, shape):
        def loss(mask):
            masks.append(None if mask is None else np.array(mask))
            return {c: 1.0 for c in CATEGORIES}
        loss.last_unit_firing = held_out_firing(shape)
        loss.last_unit_magnitude = held_out_firing(shape, seed=8)
        return loss

    calls = []

    def make_loss_fn(model, records, tok=None, **kw):
        calls.append(([r.id for r in records], kw, []))
        return recorder(calls[-1][2], ablation_shape(model.config, kw["kind"]))

    monkeypatch.setattr(losses, "make_loss_fn", make_loss_fn)
    out = tmp_path / "out"
    shutil.copytree(done, out)
    cfg = exp("ablation.model=both", "ablation.expert_mode=pre", "seed=3", "ablation.n_random=2", "ablation.neighbours=3")
    run_stage("ablate", cfg, out, overwrite=True)
    held = [r.id for r in ablate_records(cfg)]
    assert not set(held) & {r.id for r in identify_records(cfg)}
    assert [c[1]["template"] for c in calls] == ["plain", "chat"]
    models = stages.analyze_all(cfg, out, full=False).models
    for (ids, kw, masks), name in zip(calls, ["base", "tuned"], strict=True):
        assert ids == held and kw["kind"] == "neurons" and kw["expert_mode"] == "pre"
        expected = []
        ablate_identification(models[name]["isn"].ident, recorder(expected, models[name]["isn"].ident.unit_shape),
                              n_random=2, seed=3, neighbours=3,
                              firing_matched="always",  # (ablation.neuron_mass_matched's default)
                              magnitude_matched="always")  # (and ablation.neuron_magnitude_matched's)
        assert masks[0] is None and len(masks) == len(expected) > 3
        assert all(np.array_equal(m, e) for m, e in zip(masks[1:], expected[1:]))
    # the two models' sets differ, so a swap would show
    assert not np.array_equal(calls[0][2][1], calls[1][2][1])
    # The page holds one model's check: it names it, and says where the other one is.
    run_stage("report", cfg, out)
    summary = json.loads((out / "report" / "summary.json").read_text())
    assert (summary["ablation_model"], summary["ablation_not_shown"]) == ("tuned", ["base"])
    page = (out / "report" / "index.html").read_text()
    assert "Causal check: ablating neurons of tuned" in page
    assert "This is the causal check of model tuned; that of base (ablation.model=both)" in page


@pytest.mark.parametrize("overrides,named", [
    (("base.name=null", "finetuned.name=null"), r"base \('model'\) and finetuned \('model'\)"),
    # Two exports laid out as <name>/hf (as `finetune` and the demo write them) are both "hf".
    (("base.name=null", "base.path=/m/a/hf", "finetuned.name=null", "finetuned.path=/m/b/hf"),
     r"base \('hf'\) and finetuned \('hf'\)"),
    (("finetuned.name=base tuned", "series=[{name: base_tuned, init: {}}]"),
     r"series\[0\] \('base_tuned'\) and finetuned \('base tuned'\) .* 'base_tuned'"),
])
def test_models_stored_under_one_name_are_refused_before_any_work(tmp_path, overrides, named, monkeypatch):
    # Counts, sets and results live under each model's (file-safe) label: two models with one
    # label would share a count store, each collect overwriting the other's, and the
    # analysis would then ask for `collect --overwrite` again and again.
    no_weights(monkeypatch)
    out = tmp_path / "o"
    for stage in ("collect", "compare", "ablate"):
        with pytest.raises(stages.ConfigError, match=named + r".*give each a distinct name \(\w+\.name="):
            run_stage(stage, exp(*overrides), out)
    assert not (out / "counts").exists()


def test_the_held_out_tokens_fingerprinted_are_the_ones_the_loss_is_given(done, tmp_path, monkeypatch):
    # One encoding serves both: the stored digest is of the sequences the loss measures.
    import sparcom_jax.stats.losses as losses
    from sparcom_jax.categories import CATEGORIES
    from sparcom_jax.fingerprint import digest_arrays

    given = []

    def make_loss_fn(model, records, tok=None, **kw):
        given.append(kw["encoded"])
        return lambda mask: {c: 1.0 for c in CATEGORIES}

    monkeypatch.setattr(losses, "make_loss_fn", make_loss_fn)
    stages.ablate_stage(exp("ablation.n_random=0"), tmp_path, analyses=stages.analyze_all(exp(), done, full=False))
    stored = json.loads((tmp_path / "ablate" / "tuned_neurons.json").read_text())["fingerprint"]
    assert len(given) == 1 and stored["held_out_tokens"] == digest_arrays(given[0].ids, given[0].scopes)


def test_ablation_runs_the_model_in_the_counting_precision(done, tmp_path, monkeypatch):
    """The ablated sets were chosen from counts made with collect.dtype and collect.gate_dtype;
    the loss is measured on the same numerics (a bfloat16 gate flips signs a float32 one keeps),
    and a result made in other numerics is not reused."""
    import sparcom_jax.stats.losses as losses
    from sparcom_jax.categories import CATEGORIES

    seen = []

    def make_loss_fn(model, records, tok=None, **kw):
        seen.append((np.dtype(model.dtype).name, model.gate_dtype))
        return lambda mask: {c: 1.0 for c in CATEGORIES}

    monkeypatch.setattr(losses, "make_loss_fn", make_loss_fn)
    analyses = stages.analyze_all(exp(), done, full=False)
    mixed = exp("collect.dtype=bfloat16", "collect.gate_dtype=float32", "ablation.n_random=0")
    stages.ablate_stage(mixed, tmp_path, analyses=analyses)
    assert seen == [("bfloat16", "float32")]
    stored = json.loads((tmp_path / "ablate" / "tuned_neurons.json").read_text())["fingerprint"]
    assert stored["gate_dtype"] == "float32"
    # the same sets measured with a bfloat16 gate are another result
    with pytest.raises(StaleResultError, match=r"collect.gate_dtype: 'float32' -> unset"):
        stages.ablate_stage(exp("collect.dtype=bfloat16", "ablation.n_random=0"), tmp_path, analyses=analyses)
    # absent when unused: results made before gate_dtype was fingerprinted still match
    assert "gate_dtype" not in stages.ablation_fingerprint(exp(), exp().finetuned, [], "neurons", {})


def test_the_analysis_moves_records_sharing_an_instruction_together(done, tmp_path, monkeypatch):
    """collect stores each record's group key; a store written before group keys were kept gets
    them from the records it was counted on (checked by its fingerprint), one whose keys are not
    the records' is refused; evaluate resamples groups and records that it did."""
    import shutil

    from sparcom_jax.categories import CATEGORIES
    from sparcom_jax.data.splits import group_ids
    from sparcom_jax.pipeline.common import counts_root, identify_records

    no_weights(monkeypatch)
    out = tmp_path / "out"
    shutil.copytree(done, out)
    cfg = exp("identify.n_boot=2", "identify.n_perm=3")
    records = identify_records(cfg)
    meta = counts_root(cfg, out) / "base" / "meta.json"
    header = json.loads(meta.read_text())
    assert header["ids"] == [r.id for r in records] and header["groups"] == group_ids(records)
    meta.write_text(json.dumps(dict(header, groups=header["groups"][::-1])))
    with pytest.raises(StaleResultError, match=r"counts/base: the count store's group keys .* differ"):
        stages.open_model_counts(cfg, out, cfg.base)
    del header["groups"]  # as a store written before group keys were kept
    meta.write_text(json.dumps(header))
    assert stages.open_model_counts(cfg, out, cfg.base).groups == group_ids(records)
    run_stage("evaluate", cfg, out)
    s = json.loads((out / "evaluate" / "base.json").read_text())["isn"]
    assert s["bootstrap"]["unit"] == s["permutation"]["unit"] == "group"
    assert s["n_groups_per_category"] == {
        c: len({g for r, g in zip(records, group_ids(records)) if r.category == c}) for c in CATEGORIES}
    fp = json.loads((out / "evaluate" / "fingerprint.json").read_text())["components"]
    assert fp["analysis"]["resample"] == "group" and set(fp["groups"]) == set(fp["counts"])


def test_collect_overwrite_recounts_a_store_whose_group_keys_are_not_the_records(done, tmp_path, monkeypatch):
    """The analysis refuses counts whose group keys are not the records' (instruction text changed
    where no counted token did) and says to run `sparcom collect --overwrite`. The keys are not in
    the fingerprint, so collect called the store "already complete with the same settings" and
    --overwrite kept it: the fix the error named changed nothing."""
    import shutil

    from sparcom_jax.pipeline.common import counts_root

    out = tmp_path / "out"
    shutil.copytree(done, out)
    cfg = exp()
    meta = counts_root(cfg, out) / "base" / "meta.json"
    header = json.loads(meta.read_text())
    meta.write_text(json.dumps(dict(header, groups=header["groups"][::-1])))
    with monkeypatch.context() as m:
        no_weights(m)
        with pytest.raises(StaleResultError, match=r"counts/base: made with .*group keys.*--overwrite"):
            run_stage("collect", cfg, out)
    run_stage("collect", cfg, out, overwrite=True)
    assert json.loads(meta.read_text())["groups"] == header["groups"]
    assert stages.open_model_counts(cfg, out, cfg.base).groups == header["groups"]


def test_a_rerun_reuses_counts_whose_records_group_into_near_duplicates(tmp_path, monkeypatch):
    """The resume check compares the store's group keys with the records' under data.group_by:
    keys taken under another rule (identical text) would call every complete store stale."""
    from sparcom_jax.data.splits import group_ids
    from sparcom_jax.pipeline.common import group_records, identify_records

    cfg = exp("data.group_threshold=0.3")
    records = identify_records(cfg)
    assert group_records(cfg, records) != group_ids(records)  # near-duplicates joined: the case under test
    run_stage("collect", cfg, tmp_path)
    no_weights(monkeypatch)
    run_stage("collect", cfg, tmp_path)
    # and the analysis reads them with the near-duplicate keys, which the store kept
    assert stages.open_model_counts(cfg, tmp_path, cfg.base).groups == group_records(cfg, records)


@pytest.mark.parametrize("stage, nth, named", [
    ("collect", 0, "the command (stage, --overwrite) or config"),
    ("collect", 1, "the records (data.path as each host reads it)"),
    ("collect", 2, "collect base: the model files"),
    ("ablate", 1, "ablate tuned: neurons: the model files, held-out records or counts"),
])
def test_processes_that_read_another_config_records_or_model_stop_together(done, stage, nth, named, monkeypatch):
    """Each process of a multi-host run reads its own config, records and weights (its host's
    files) and counts or evaluates its share with them; results merged from processes that
    read different ones would look like one run's. Here process 1 of 2 reads something else
    at the `nth` comparison: every process stops, naming it, before any weights are read."""
    from sparcom_jax.errors import ConfigError
    from sparcom_jax.parallel import processes

    no_weights(monkeypatch)
    calls = []

    def gather_keys(key):  # as two processes would gather, process 1's key other at the nth call
        k = processes.key_id(key)
        calls.append(key)
        return np.array([k, k + 1 if len(calls) == nth + 1 else k])

    monkeypatch.setattr(processes, "gather_keys", gather_keys)
    with pytest.raises(ConfigError) as e:
        run_stage(stage, exp(), done)
    assert str(e.value).startswith(f"{named} of process(es) 1 of 2 differ from process 0's"), str(e.value)


def test_a_process_with_another_config_is_refused_naming_the_settings_that_differ(tmp_path, monkeypatch):
    """Eight hosts, each reading its own copy of the config: the refusal said only that process 1's
    config differed. Process 1 of 2 here was started with identify.eps=0.1 and --overwrite."""
    from sparcom_jax.errors import ConfigError
    from sparcom_jax.parallel import processes

    held = [stages.run_key("identify", exp(), False), stages.run_key("identify", exp("identify.eps=0.1"), True)]
    monkeypatch.setattr(processes, "gather_keys", lambda key: np.array([processes.key_id(k) for k in held]))
    monkeypatch.setattr(processes, "gather", lambda ids: np.stack([processes.part_ids(k) for k in held]))
    with pytest.raises(ConfigError) as e:
        run_stage("identify", exp(), tmp_path / "out")
    assert str(e.value) == ("the command (stage, --overwrite) or config of process(es) 1 of 2 differ from process "
                            "0's (--overwrite, identify.eps); start every process with the same command line and "
                            "config file")


def test_a_process_waiting_for_process_0s_lock_stops_with_its_error(tmp_path, monkeypatch):
    """Process 0 alone takes the output directory's lock; when another run holds it, process 0
    stopped alone and the others went on into the stage, to wait for it at their next step.
    Seen from process 1 (process 0 reports an error when the processes meet): it stops too,
    naming process 0, before any work of the stage."""
    from sparcom_jax.errors import OtherProcessError
    from sparcom_jax.parallel import processes

    def gather(values):  # two processes: process 0 failed, keys compared alike
        return np.array([True, values]) if isinstance(values, bool) else np.array([values, values])

    monkeypatch.setattr(processes, "gather", gather)
    monkeypatch.setattr(stages, "is_primary", lambda: False)
    monkeypatch.setitem(stages.STAGE_FUNCS, "identify", lambda *a, **k: pytest.fail("the stage ran"))
    with pytest.raises(OtherProcessError, match=r"^identify: locking the output directory: process 0 of \d "
                                                r"stopped with an error"):
        run_stage("identify", exp(), tmp_path / "out")


def test_processes_agree_on_the_config_but_not_on_where_each_host_mounts_its_files():
    """Hosts may mount the same model, data and output directory at different paths: those are
    compared by what they hold (digests, the shared-directory probe), not by name."""
    key = lambda *over, stage="collect", overwrite=False: stages.run_key(stage, exp(*over), overwrite)  # noqa: E731
    assert key("collect.store=/mnt/a/counts", "out_dir=/mnt/a/out", "data.path=/mnt/a/data") == \
        key("collect.store=/nfs/counts", "out_dir=/nfs/out", "data.path=/nfs/data")
    assert key() != key("identify.eps=0.1")
    assert key() != key(stage="identify") and key() != key(overwrite=True)


def test_every_field_expanded_as_a_path_is_left_out_of_the_run_key():
    """run_key kept its own list of path field names beside the fields config.py expands: a path
    field added to one only would make hosts that mount it elsewhere be refused (or leave one
    setting unchecked). Every string field of every section is tried: expanded <=> left out."""
    import dataclasses
    import typing

    from sparcom_jax.errors import ConfigError

    cfg = exp()
    expanded, left_out = set(), set()
    sections = [("", cfg)] + [(f.name + ".", getattr(cfg, f.name)) for f in dataclasses.fields(cfg)
                              if dataclasses.is_dataclass(getattr(cfg, f.name))]
    for prefix, spec in sections:
        for name, tp in typing.get_type_hints(type(spec)).items():
            if str not in (tp, *typing.get_args(tp)):
                continue
            key = prefix + name
            try:
                a, b = exp(f"{key}=~/sparcom-a"), exp(f"{key}=~/sparcom-b")
            except ConfigError:  # a string the field refuses (an unknown adapter name)
                continue
            value = getattr(getattr(a, prefix[:-1]) if prefix else a, name)
            if value != "~/sparcom-a":
                expanded.add(key)
            if stages.run_key("collect", a, False) == stages.run_key("collect", b, False):
                left_out.add(key)
    assert {"out_dir", "base.path", "finetuned.path", "data.path", "collect.store"} <= expanded
    assert expanded == left_out


# Each fingerprint component and a setting that only it records: changing the setting must
# change that component, and only the components that depend on it.
COLLECT_FIELDS = [
    (("collect.dtype=bfloat16",), {}, {"dtype"}),
    (("collect.sums=false", "identify.ties=keep"), {}, {"sums"}),
    (("base.seed=7",), {}, {"model"}),
    (("data.scope=prompt",), {}, {"scope", "tokens"}),
    (("data.max_length=12",), {}, {"max_length", "tokens"}),
    (("data.group_threshold=0.7",), {}, {"grouping"}),
    (("data.group_by=text",), {}, {"grouping"}),
    ((), {"template": "chat"}, {"template", "tokens"}),
    ((), {"gate_dtype": "float32"}, {"gate_dtype"}),
]


def test_collect_fingerprint_records_each_setting_in_its_component():
    import dataclasses

    from sparcom_jax.data import load_instructions
    from sparcom_jax.fingerprint import difference
    from sparcom_jax.pipeline.provenance import collect_fingerprint

    recs = load_instructions(n_per_category=1)

    def fp(cfg, records=recs, template="plain", **kw):
        return collect_fingerprint(cfg, cfg.base, records, template, **kw)[0]

    base = fp(exp())
    # absent when unused: stores counted before these options existed still match
    assert not {"gate_dtype", "content_caps"} & set(base) and "grouping" not in fp(exp("data.group_by=text"))
    for overrides, kwargs, changed in COLLECT_FIELDS:
        assert set(difference(base, fp(exp(*overrides), **kwargs))) == changed, (overrides, kwargs)
    # the records: their ids and labels, and (through the tokens) their text
    assert difference(base, fp(exp(), [dataclasses.replace(recs[0], id="another"), *recs[1:]])) == ["records"]
    edited = [dataclasses.replace(recs[0], instruction="Another instruction."), *recs[1:]]
    assert difference(base, fp(exp(), edited)) == ["tokens"]


def test_ablation_fingerprint_records_each_setting_in_its_component():
    from sparcom_jax.data import load_instructions
    from sparcom_jax.fingerprint import difference
    from sparcom_jax.pipeline.stages import ablation_fingerprint

    recs = load_instructions(n_per_category=1)

    def fp(*overrides, kind="neurons", counts_fp=None, records=recs):
        cfg = exp(*overrides)
        return ablation_fingerprint(cfg, cfg.finetuned, records, kind, counts_fp or {})

    base = fp()
    assert "gate_dtype" not in base  # absent when unused: results made before it existed still match
    for overrides, key in [(("ablation.n_random=2",), "ablation"), (("ablation.neighbours=3",), "ablation"),
                           (("seed=4",), "ablation"), (("ablation.expert_mode=pre",), "ablation"),
                           (("identify.eps=0.1",), "identify"), (("data.max_length=40",), "max_length"),
                           (("collect.dtype=bfloat16",), "dtype"), (("collect.gate_dtype=float32",), "gate_dtype"),
                           (("finetuned.template=plain",), "template"), (("finetuned.seed=3",), "model")]:
        assert difference(base, fp(*overrides)) == [key], overrides
    assert difference(base, fp(kind="experts")) == ["ablation"]
    assert difference(base, fp(counts_fp={"tokens": "0" * 16})) == ["counts"]
    assert difference(base, fp(records=recs[1:])) == ["records"]
    # how the check is batched does not change its result
    assert difference(base, fp("ablation.batch_size=5")) == []


def test_an_ablation_of_experts_is_told_from_one_of_neurons_without_the_mass_rule():
    """The kind is recorded itself, not only through the experts' mass-matched rule: with the
    rule off, an experts result and a neurons result differ by their kind, by which the
    reuse check picks the identify parameters its sets depend on (`_as_compared`)."""
    from sparcom_jax.data import load_instructions
    from sparcom_jax.fingerprint import difference
    from sparcom_jax.pipeline.stages import ablation_fingerprint

    cfg, recs = exp("ablation.mass_matched=false"), load_instructions(n_per_category=1)
    neurons, experts = (ablation_fingerprint(cfg, cfg.finetuned, recs, kind, {}) for kind in ("neurons", "experts"))
    assert difference(neurons, experts) == ["ablation"]
    assert (neurons["ablation"]["kind"], experts["ablation"]["kind"]) == ("neurons", "experts")


def test_a_causal_check_is_compared_by_the_rule_parameters_its_sets_use():
    """The reuse check cuts the identify rule to the parameters the kind's sets depend on
    (`_as_compared`): eps, which every set uses, still refuses the result."""
    from sparcom_jax.data import load_instructions
    from sparcom_jax.pipeline.stages import _as_compared, ablation_fingerprint

    recs = load_instructions(n_per_category=1)
    for kind in ("neurons", "experts"):
        a, b = (ablation_fingerprint(c, c.finetuned, recs, kind, {}) for c in (exp(), exp("identify.eps=0.1")))
        assert _as_compared(a) != _as_compared(b), kind
        assert _as_compared(a)["identify"]["eps"] == 0.05


def test_train_fingerprint_records_each_setting_in_its_component():
    import dataclasses

    from sparcom_jax.data import default_tokenizer, load_instructions
    from sparcom_jax.fingerprint import difference
    from sparcom_jax.pipeline.stages import train_config, train_fingerprint

    recs, tok = load_instructions(n_per_category=1), default_tokenizer()
    tcfg = train_config(exp())
    base = train_fingerprint("b", tcfg, recs, tok)
    assert difference(base, train_fingerprint("b2", tcfg, recs, tok)) == ["base"]
    faster = dataclasses.replace(tcfg, learning_rate=0.1)
    assert difference(base, train_fingerprint("b", faster, recs, tok)) == ["train"]
    assert difference(base, train_fingerprint("b", tcfg, recs[1:], tok)) == ["records", "tokens"]
    edited = [dataclasses.replace(recs[0], output="Another response."), *recs[1:]]
    assert difference(base, train_fingerprint("b", tcfg, edited, tok)) == ["tokens"]
    # logging, evaluation batches, checkpoint writing and the mesh do not change the weights
    quiet = dataclasses.replace(tcfg, log_every=7, eval_batch_size=3, async_checkpointing=not tcfg.async_checkpointing,
                                mesh_data=1, mesh_model=1)
    assert difference(base, train_fingerprint("b", quiet, recs, tok)) == []


def test_a_model_is_fingerprinted_by_its_files_or_by_its_architecture_and_seed(tmp_path):
    """A random-init model is its architecture and its seed (another hidden size from the same
    seed is another model); a model directory is the content of its files, whatever the spec's
    init and seed say."""
    import dataclasses

    from sparcom_jax.fingerprint import model_files_fingerprint
    from sparcom_jax.pipeline.provenance import spec_model_fingerprint

    spec = exp().base
    wider = dataclasses.replace(spec, init={**spec.init, "hidden_size": 64})
    reseeded = dataclasses.replace(spec, seed=spec.seed + 1)
    assert len({spec_model_fingerprint(s) for s in (spec, wider, reseeded)}) == 3
    dirs = []
    for name, weights in (("a", b"one"), ("b", b"two")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text("{}")
        (tmp_path / name / "model.safetensors").write_bytes(weights)
        dirs.append(dataclasses.replace(spec, path=str(tmp_path / name)))
    a, b = (spec_model_fingerprint(s) for s in dirs)
    assert a == model_files_fingerprint(tmp_path / "a") != b


def test_held_out_tokens_cover_the_positions_the_loss_scores():
    """The causal check's loss is measured on the scored positions (`scopes`) of the held-out
    sequences: the same tokens scored elsewhere are another measurement, in the digest of the
    whole set and in the record's own digest."""
    from types import SimpleNamespace

    import numpy as np

    from sparcom_jax.fingerprint import changed_records
    from sparcom_jax.pipeline.provenance import held_out_fingerprint

    cfg = exp()
    ids = [np.arange(6, dtype=np.int32), np.arange(4, dtype=np.int32)]

    def fp(*scored):
        enc = SimpleNamespace(ids=ids, scopes=[np.arange(len(i)) >= k for i, k in zip(ids, scored)],
                              record_ids=["a", "b"], categories=["math", "code"])
        return held_out_fingerprint(cfg, cfg.finetuned, [], encoded=enc)

    (tokens, index), (moved, moved_index) = fp(3, 2), fp(3, 1)
    assert tokens != moved
    assert changed_records(index, moved_index) == "1 of 2 records: 'b' (code)"


def test_a_fine_tuning_run_s_tokens_cover_the_positions_it_trains_on():
    """The loss of fine-tuning is taken on the response positions (the scopes of
    `train_encoding`): the same tokens trained on elsewhere are another run."""
    from types import SimpleNamespace

    import numpy as np

    from sparcom_jax.data import default_tokenizer
    from sparcom_jax.fingerprint import difference
    from sparcom_jax.pipeline.stages import train_config, train_fingerprint

    tcfg, ids = train_config(exp()), [np.arange(6, dtype=np.int32)]

    def fp(first):
        enc = SimpleNamespace(ids=ids, scopes=[np.arange(6) >= first], record_ids=["a"])
        return train_fingerprint("b", tcfg, [], default_tokenizer(), enc=enc)

    assert difference(fp(3), fp(2)) == ["tokens"]


# Train settings that do not change the tuned weights (logging, evaluation batches, checkpoint
# writing, the mesh, and whether records cut before their response are refused or trained on nothing).
TRAIN_NOT_RESULT = {"log_every", "eval_batch_size", "async_checkpointing", "mesh_data", "mesh_model",
                    "allow_cut_responses"}


def _other_value(tcfg, name):
    """`tcfg` with field `name` changed to another value it accepts."""
    import dataclasses

    from sparcom_jax.train import TrainConfigError

    value = getattr(tcfg, name)
    if isinstance(value, bool):
        candidates = [not value]
    elif isinstance(value, str):
        candidates = {"optimizer": ["lion", "adamw"], "compute_dtype": ["bfloat16", "float32"],
                      "template": ["chat", "plain"]}[name]
    elif isinstance(value, tuple):
        candidates = [(*value, value[-1] * 2)]
    elif value is None:
        candidates = [3, 0.5]
    else:
        candidates = [value * 2, value + 1, value / 2, value - 1]
    for v in (v for v in candidates if v != value):
        try:
            return dataclasses.replace(tcfg, **{name: type(value)(v) if value is not None else v})
        except (TrainConfigError, ValueError):
            continue
    raise AssertionError(f"no other valid value for train.{name}: add one to _other_value")


def test_every_train_setting_that_changes_the_weights_is_in_the_run_s_fingerprint():
    """Each TrainConfig field (new ones too) changes the fine-tuning run's "train" component,
    but those that cannot change the tuned weights: checkpoints tuned with another seed,
    batch size, schedule or decay are refused, not reused."""
    import dataclasses

    from sparcom_jax.data import default_tokenizer, load_instructions
    from sparcom_jax.fingerprint import difference
    from sparcom_jax.pipeline.stages import train_config, train_fingerprint
    from sparcom_jax.train import TrainConfig

    recs, tok = load_instructions(n_per_category=1), default_tokenizer()
    tcfg = train_config(exp("train.buckets=[48, 64]", "train.max_length=48", "train.total_steps=40",
                            "train.clip_norm=1.0"))
    base = train_fingerprint("b", tcfg, recs, tok)
    fields = [f.name for f in dataclasses.fields(TrainConfig)]
    assert TRAIN_NOT_RESULT < set(fields)
    for name in fields:
        changed = difference(base, train_fingerprint("b", _other_value(tcfg, name), recs, tok))
        assert ("train" in changed) == (name not in TRAIN_NOT_RESULT), (name, changed)


def test_analysis_fingerprint_records_the_rule_the_settings_the_counts_and_the_groups():
    from types import SimpleNamespace

    from sparcom_jax.fingerprint import difference

    def analyses(counts_fp="a", groups=("g1", "g2")):
        ma = SimpleNamespace(meta={"fingerprint": {"tokens": counts_fp}},
                             fields={"isn": SimpleNamespace(ident=SimpleNamespace(groups=list(groups)))})
        return stages.Analyses({"base": ma}, {"same_template": ma})

    def fp(*overrides, full=True, **kw):
        return stages._analysis_fingerprint(exp(*overrides), analyses(**kw), full)

    base = fp()
    assert set(base["counts"]) == {"base", "control:same_template"} and set(base["groups"]) == set(base["counts"])
    assert difference(base, fp("identify.eps=0.1")) == ["identify"]
    assert difference(base, fp("identify.n_boot=7")) == ["analysis"]
    assert difference(base, fp(counts_fp="b")) == ["counts"]
    assert difference(base, fp(groups=("g1", "g1"))) == ["groups"]
    # identify and ablate use the sets alone: no resampling settings, no groups
    sets_only = fp(full=False)
    assert "groups" not in sets_only and difference(sets_only, fp("identify.n_boot=7", full=False)) == []


def test_same_template_control_is_bootstrapped_with_the_models_draws(done, tmp_path, monkeypatch):
    """compare bootstraps the same-template control with the draws of the models, so the control
    and the template effect (main comparison minus control) carry paired intervals."""
    import shutil

    from sparcom_jax.categories import CATEGORIES

    no_weights(monkeypatch)
    out = tmp_path / "out"
    shutil.copytree(done, out)
    run_stage("compare", exp("identify.n_boot=3", "identify.n_perm=0"), out)
    main = json.loads((out / "compare" / "comparison.json").read_text())["isn"]
    ctrl = json.loads((out / "compare" / "same_template.json").read_text())["isn"]
    for c in CATEGORIES:
        eff = ctrl[c]["template_effect"]
        assert eff["paired"] and eff["n_boot"] == 3 and ctrl[c]["bootstrap"]["paired"]
        assert eff["lost"]["estimate"] == main[c]["lost"] - ctrl[c]["lost"]
        assert eff["lost"]["low"] <= eff["lost"]["high"]


@pytest.fixture(scope="module")
def moe_done(tmp_path_factory):
    """An output directory where collect ran on a tiny Mixtral (experts only, 2 random draws)."""
    out = tmp_path_factory.mktemp("moe") / "out"
    run_stage("collect", exp(*MOE_OVER), out)
    return out


MOE_OVER = [f"base.init={json.dumps(TINY_MOE)}", f"finetuned.init={json.dumps(TINY_MOE)}", "ablation.kinds=[experts]",
            "ablation.n_random=2", "collect.template_control=false", "identify.eps_experts=0.1"]


def fake_expert_loss(calls):
    """A make_loss_fn whose loss records each mask and reports a uniform expert mass on the
    categories that have scored held-out tokens (as CategoryLoss does)."""
    from sparcom_jax.stats.losses import response_coverage

    def make_loss_fn(model, records, tok=None, **kw):
        L, E = model.config.num_layers, model.config.num_experts
        scored = [c for c, v in response_coverage(kw["encoded"]).items() if v["response_tokens"]]

        def loss(mask):
            calls.append(mask)
            loss.last_expert_mass = {c: np.full((L, E), 1.0 / E) for c in scored}
            return {c: 1.0 + (0 if mask is None else float(np.sum(mask))) for c in scored}
        return loss
    return make_loss_fn


def test_an_error_of_another_process_stops_the_expert_ablation_instead_of_skipping_it(moe_done, tmp_path,
                                                                                      monkeypatch, capsys):
    """OtherProcessError is a ValueError: caught as "the sets cover a layer", one host's failed
    pass (GPU OOM) made the others log "experts skipped" and wait at the next write for the
    host that had quit. The layer check now runs before the passes, which are not caught."""
    import shutil

    import sparcom_jax.stats.losses as losses
    from sparcom_jax.errors import OtherProcessError
    from sparcom_jax.parallel import processes

    real = processes.raise_together

    def other_fails(error, what):
        if what == "ablate: expert mass":  # the first pass of the experts' check
            raise OtherProcessError(f"{what}: process 1 of 2 stopped with an error")
        real(error, what)

    monkeypatch.setattr(losses, "make_loss_fn", fake_expert_loss([]))
    monkeypatch.setattr(processes, "raise_together", other_fails)
    out = tmp_path / "out"
    shutil.copytree(moe_done, out)
    with pytest.raises(OtherProcessError, match="^ablate: expert mass: process 1 of 2"):
        run_stage("ablate", exp(*MOE_OVER), out)
    assert "skipped" not in capsys.readouterr().err


def test_expert_ablation_runs_the_baseline_once_and_counts_only_the_passes_it_runs(moe_done, tmp_path,
                                                                                   monkeypatch):
    """The mass-matched control's baseline pass is the check's baseline (it ran twice), and a
    category with a set but no scored held-out token gets no mass-matched draws: the count
    (the progress bar's end, and which process runs the mass pass) leaves them out."""
    import shutil

    import sparcom_jax.stats.losses as losses
    from sparcom_jax.categories import CATEGORIES

    real_encode = losses.encode_held_out

    def code_cut_away(*a, **k):  # every "code" record loses its response: no scored token
        enc = real_encode(*a, **k)
        for cat, scope in zip(enc.categories, enc.scopes):
            if cat == "code":
                scope[:] = False
        return enc

    class Counting(stages._Counting):
        def __exit__(self, *exc):
            ends.append((self.bar.n, self.total))
            super().__exit__(*exc)

    calls, ends = [], []
    monkeypatch.setattr(losses, "make_loss_fn", fake_expert_loss(calls))
    monkeypatch.setattr(losses, "encode_held_out", code_cut_away)
    monkeypatch.setattr(stages, "_Counting", Counting)
    out = tmp_path / "out"
    shutil.copytree(moe_done, out)
    res = stages.ablate_stage(exp(*MOE_OVER), out)["_results"][("tuned", "experts")]
    a = CATEGORIES.index("code")
    assert res.set_sizes[a] > 0 and np.isnan(res.mass_random_draws[:, a]).all()
    assert sum(m is None for m in calls) == 1
    assert ends == [(len(calls), len(calls))]
    assert res.baseline == {c: 1.0 for c in CATEGORIES if c != "code"}


def test_collect_asks_the_processes_about_the_stores_sums_only_when_the_config_leaves_them_off(done, tmp_path,
                                                                                               monkeypatch):
    # With collect.sums every process counts them whatever its store holds: no collective for it.
    import shutil

    from sparcom_jax.parallel import processes

    real, flags = processes.gather, []

    def gather(values):
        if isinstance(values, (bool, np.bool_)):
            flags.append(values)
        return real(values)

    monkeypatch.setattr(processes, "gather", gather)
    out = tmp_path / "out"
    shutil.copytree(done, out)
    asked = []
    for cfg in (exp(), exp("identify.ties=keep", "collect.sums=false")):
        del flags[:]
        run_stage("collect", cfg, out)  # every store already complete (one with the sums serves both)
        asked.append(len(flags))
    assert asked[0] < asked[1], asked  # the same run else, one question fewer per store


# --------------------------------------------------------------------------- #
# The environment: recorded with every output, named when reused work was made under another
# --------------------------------------------------------------------------- #

def test_every_stage_records_the_environment_it_ran_under(done):
    from sparcom_jax.fingerprint import environment, environment_line

    env = environment()
    for stage in ("identify", "evaluate", "compare"):
        assert json.loads((done / stage / "fingerprint.json").read_text())["environment"] == env
    stores = sorted((done / "counts").rglob("meta.json"))
    assert len(stores) == 3 and all(json.loads(p.read_text())["meta"]["environment"] == env for p in stores)
    assert json.loads((done / "ablate" / "tuned_neurons.json").read_text())["environment"] == env
    summary = json.loads((done / "report" / "summary.json").read_text())
    assert summary["environment"] == env and summary["environment_changes"] == []
    assert summary["models"]["base"]["meta"]["environment"] == env  # each model's counts', beside its numbers
    page = (done / "report" / "index.html").read_text()
    assert f"Software: sparcom_jax {env['sparcom_jax']['version']}" in page and "under the same versions" in page
    table = next((done / "report" / "tables").glob("*.csv")).read_text().splitlines()
    assert table[1] == f"# environment: {environment_line(env)}" and f"jax {env['packages']['jax']} (" in table[1]


def test_counts_set_against_counts_of_other_versions_are_named_once_and_listed_in_the_summary(
        done, tmp_path, monkeypatch, capfd):
    import shutil

    import jax
    from test_open_run import edit_json

    import sparcom_jax as sj
    from sparcom_jax.fingerprint import UNRECORDED, environment

    out = tmp_path / "out"
    shutil.copytree(done, out)
    # the base model's counts made under another jax; the causal check by a sparcom_jax that recorded none
    edit_json(out / "counts" / "base" / "meta.json", lambda h: h["meta"]["environment"]["packages"].update(jax="0.4.30"))
    edit_json(out / "ablate" / "tuned_neurons.json", lambda d: d.pop("environment"))
    no_weights(monkeypatch)
    capfd.readouterr()
    run_stage("run", exp(), out)
    err = capfd.readouterr().err
    # before and after counted under two jax versions: the comparison mixes them, said once
    line = (f"analyse: outputs set against each other here were made under different versions ("
            f"{out / 'counts' / 'base'}: jax 0.4.30; {out / 'counts' / 'tuned'}: jax {jax.__version__}; ")
    assert line in err and err.count("analyse: outputs set against each other") == 1, err
    # the report adds the causal check, naming only it: each output is named once in the run
    assert (f"report: outputs set against each other here were made under different versions "
            f"({out / 'ablate' / 'tuned_neurons.json'}: not recorded; beside the outputs named above)") in err, err
    assert err.count(f"{out / 'counts' / 'base'}: jax 0.4.30") == 1, err
    assert "made under other versions than this run's" not in err  # reused whole: nothing new beside them
    summary = json.loads((out / "report" / "summary.json").read_text())
    changes = [{"stage": "collect", "output": "counts/base", "package": "jax", "old": "0.4.30", "new": jax.__version__,
                "matters": True},
               {"stage": "ablate", "output": "ablate/tuned_neurons.json", **UNRECORDED, "matters": True}]
    assert summary["environment_changes"] == changes and summary["environment"] == environment()
    assert summary["environment_parts"] == []
    page = (out / "report" / "index.html").read_text()
    assert "Outputs set against each other, made under other versions" in page and "0.4.30" in page
    # reused, not recomputed: the counts still say what made them
    assert json.loads((out / "counts" / "base" / "meta.json").read_text())["meta"]["environment"]["packages"]["jax"] == "0.4.30"
    run = sj.open_run(out)
    assert run.environment == environment() and run.environment_changes == changes
    assert "2 reused output(s) made under other versions" in repr(run)
    # a stage run alone says it too: the report reads the counts without collect having run
    alone = tmp_path / "alone"
    shutil.copytree(out, alone)
    run_stage("report", exp(), alone)
    err = capfd.readouterr().err
    assert f"({alone / 'counts' / 'base'}: jax 0.4.30; " in err
    assert f"{alone / 'ablate' / 'tuned_neurons.json'}: not recorded" in err


def test_a_store_resumed_under_other_versions_is_said_and_shown_with_the_chunks_each_made(tmp_path, monkeypatch,
                                                                                          capfd):
    """A collection stopped after its first chunk under another jax, resumed under this one: collect
    says so (new chunks beside old), the store records both, and the summary, the page's Software
    line and open_run name them with their chunks."""
    import functools

    import jax

    import sparcom_jax as sj
    import sparcom_jax.fingerprint as F
    import sparcom_jax.stats.collect as C

    real_collect, real_versions = C.collect_counts, F._package_versions()
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        m.setattr(F, "_package_versions", lambda: {**real_versions, "jax": "0.0.1"})
        m.setattr(C, "collect_counts", functools.partial(real_collect, chunk_rows=4, _stop_after_chunks=1))
        with pytest.raises(KeyboardInterrupt):
            run_stage("collect", exp(), out)
    monkeypatch.setattr(C, "collect_counts", functools.partial(real_collect, chunk_rows=4))
    capfd.readouterr()
    run_stage("run", exp(), out)
    err = capfd.readouterr().err
    assert (f"collect: reusing {out / 'counts' / 'base'}, made under other versions than this run's (jax 0.0.1 -> "
            f"{jax.__version__}); its numbers mix the two") in err
    text = f"counts/base made under jax 0.0.1 (chunk 0) and jax {jax.__version__} (chunks 1-2)"
    summary = json.loads((out / "report" / "summary.json").read_text())
    assert [p["text"] for p in summary["environment_parts"]] == [text]
    assert [p["part"] for p in summary["environment_parts"][0]["parts"]] == ["chunk 0", "chunks 1-2"]
    assert summary["environment_changes"] == [{"stage": "collect", "output": "counts/base", "part": "chunk 0",
                                               "package": "jax", "old": "0.0.1", "new": jax.__version__,
                                               "matters": True}]
    assert len(summary["models"]["base"]["meta"]["environments"]) == 2
    page = (out / "report" / "index.html").read_text()
    software = next(ln for ln in page.splitlines() if "Software: " in ln)
    assert text in software
    run = sj.open_run(out)
    assert run.environment_parts == summary["environment_parts"] and f"made in parts: {text}" in repr(run)


def other_device(env):
    return {**env, "backend": "tpu", "device_kind": "TPU v5 lite"}


def test_counts_made_on_another_backend_are_recorded_quietly_where_only_numpy_reads_them(done, tmp_path,
                                                                                        monkeypatch, capfd):
    """Counts and causal checks all made on an accelerator, the report written on a CPU: numpy
    recomputes the same numbers from the same integer counts and losses, so nothing is said; the
    changes are recorded (not "matters"). The causal check recomputed from those counts runs new
    model computation beside them: that one says so."""
    import shutil

    from test_open_run import edit_json

    from sparcom_jax.fingerprint import environment

    out = tmp_path / "out"
    shutil.copytree(done, out)
    for meta in (out / "counts").rglob("meta.json"):
        edit_json(meta, lambda h: h["meta"].update(environment=other_device(h["meta"]["environment"])))
    edit_json(out / "ablate" / "tuned_neurons.json", lambda d: d.update(environment=other_device(d["environment"])))
    no_weights(monkeypatch)
    capfd.readouterr()
    run_stage("report", exp(), out)
    err = capfd.readouterr().err
    assert "other versions" not in err and "set against each other" not in err, err
    summary = json.loads((out / "report" / "summary.json").read_text())
    changes = summary["environment_changes"]
    env = environment()
    assert {(c["output"], c["package"], c["old"], c["new"], c["matters"]) for c in changes} == {
        (o, k, v, env[k], False) for o in ("counts/base", "counts/tuned", "counts/tuned_under_plain_template",
                                           "ablate/tuned_neurons.json")
        for k, v in (("backend", "tpu"), ("device_kind", "TPU v5 lite"))}
    page = (out / "report" / "index.html").read_text()
    assert "cannot change a number here" in page and "Outputs set against each other" not in page
    # the causal check measured again: losses of this backend on sets the TPU counts chose
    (out / "ablate" / "tuned_neurons.json").unlink()
    monkeypatch.undo()
    run_stage("ablate", exp(), out)
    err = capfd.readouterr().err
    assert (f"ablate: reusing {out / 'counts' / 'tuned'}, made under other versions than this run's (backend tpu -> "
            f"{env['backend']}, device_kind TPU v5 lite -> {env['device_kind']}); its numbers mix the two") in err


def test_a_fine_tuning_run_resumed_under_other_versions_records_both_and_says_so(tuned, tmp_path, monkeypatch,
                                                                                  capfd):
    import shutil

    import flax
    from test_open_run import edit_json

    from sparcom_jax.fingerprint import environment, parts_line
    from sparcom_jax.train.checkpointing import CHECKPOINT_SUBDIR

    src, cfg = tuned
    out = tmp_path / "out"
    shutil.copytree(src, out)
    edit_json(out / "train" / "fingerprint.json", lambda f: f["environment"]["packages"].update(flax="0.10.0"))
    first = json.loads((out / "train" / "fingerprint.json").read_text())
    changed = f"made under other versions than this run's (flax 0.10.0 -> {flax.__version__})"
    # finished, and reused as it is: nothing new is trained beside it, nothing said or recorded anew
    capfd.readouterr()
    run_stage("finetune", from_dict(ExperimentConfig, cfg, "t"), out)
    assert "made under other versions" not in capfd.readouterr().err
    assert json.loads((out / "train" / "fingerprint.json").read_text()) == first
    # nor by the stages that count its checkpoints (fixed weights, counted afresh)
    other = tmp_path / "other"
    shutil.copytree(out, other)
    with monkeypatch.context() as m:
        no_weights(m)
        stages.preflight("collect", from_dict(ExperimentConfig, cfg, "t"), other)
    assert "made under other versions" not in capfd.readouterr().err
    # stopped after step 1 of 2 under flax 0.10.0, resumed under this one: step 2 continues step 1
    shutil.rmtree(out / "train" / CHECKPOINT_SUBDIR / "2")
    run_stage("finetune", from_dict(ExperimentConfig, cfg, "t"), out)
    assert f"finetune: reusing {out / 'train'}, {changed}" in capfd.readouterr().err
    kept = json.loads((out / "train" / "fingerprint.json").read_text())
    old = {**environment(), "packages": {**environment()["packages"], "flax": "0.10.0"}}
    assert kept["environment"] == old  # the first, as readers of one environment take it
    assert kept["environments"] == [{"environment": old, "from": 0, "unit": "step"},
                                    {"environment": environment(), "from": 1, "unit": "step"}]
    parts = stages.train_parts(out / "train")
    assert [p["part"] for p in parts] == ["step 1", "step 2"]
    assert parts_line("train", parts, ["step 1", "step 2"]) == (
        f"train made under flax 0.10.0 (step 1) and flax {flax.__version__} (step 2)")


