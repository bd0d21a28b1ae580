"""What a notebook user meets first: what `import sparcom_jax` pulls in, warnings on the
first calls, and how the main result objects display."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest

import sparcom_jax as sj
from sparcom_jax.errors import StaleResultError


def test_loading_and_saving_a_model_use_no_deprecated_flax_api(hf_checkpoint, tmp_path):
    # flax 0.12 deprecated Variable.value (read and write); it warned once per tensor and will go away.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = sj.load_model(hf_checkpoint("llama"), with_tokenizer=False)
        saved = sj.save_model(model, tmp_path / "m")
    deprecated = [str(w.message).splitlines()[0] for w in caught if issubclass(w.category, DeprecationWarning)]
    assert deprecated == []
    assert (saved / "model.safetensors").is_file()


def _study_counts(n_per_category: int = 20, L: int = 4, F: int = 256):
    """Counts of a study-sized record list (ids, sources, meta) over a small model, in memory."""
    from sparcom_jax.categories import CATEGORIES
    from sparcom_jax.stats.counts import Counts

    rng = np.random.default_rng(0)
    n = n_per_category * len(CATEGORIES)
    tokens = rng.integers(20, 60, n).astype(np.int32)
    active = np.minimum(rng.poisson(8.0, (n, L, F)), tokens[:, None, None]).astype(np.int32)
    return Counts(tokens=tokens, neuron_active=active, categories=[CATEGORIES[i % 6] for i in range(n)],
                  ids=[f"record-with-a-long-id-{i:05d}" for i in range(n)],
                  sources=["human-written" if i % 2 else "template-varied" for i in range(n)],
                  meta={"model": "/models/tiny", "dtype": "float32", "scope": "content", "template": "plain",
                        "fingerprint": {"tokens": "f" * 16}, "n_empty_scope": {c: 0 for c in CATEGORIES}})


def test_counts_display_their_shapes_and_provenance_not_their_contents(tmp_path):
    from sparcom_jax.stats.store import CountStore, open_counts

    counts = _study_counts()
    text = repr(counts)
    assert text.splitlines() == [
        "Counts: 120 records (CLS 20, CODE 20, QA 20, GEN 20, MATH 20, SUM 20)",
        "  tokens                 int32 [120]",
        "  neuron_active          int32 [120, 4, 256]",
        "  model '/models/tiny', dtype 'float32', scope 'content', template 'plain'",
        "  in memory",
    ]
    # The same counts in a store: read lazily, and shown without reading them.
    shapes = {"tokens": (120,), "neuron_active": (120, 4, 256)}
    store = CountStore(tmp_path / "store", shapes, ids=counts.ids, categories=counts.categories,
                       sources=counts.sources, meta=counts.meta, chunk_rows=120)
    store.write_chunk(0, {"tokens": counts.tokens, "neuron_active": counts.neuron_active})
    store.close()
    lazy = open_counts(tmp_path / "store")
    assert repr(lazy).splitlines()[:4] == text.splitlines()[:4]
    assert repr(lazy).splitlines()[4] == f"  read lazily from {tmp_path / 'store'}"
    assert repr(lazy.neuron_active) == "LazyArray(int32 [120, 4, 256], on disk)"


def test_analysis_results_display_their_headline_figures(tmp_path):
    from sparcom_jax.analysis import IdentifyConfig, ablate_identification, analyze_model
    from sparcom_jax.categories import CATEGORIES

    analysis = analyze_model(_study_counts(), IdentifyConfig(eps=0.02), name="base", n_boot=3, n_perm=9)
    s = analysis["isn"].summary

    def per_cat(values):
        return ", ".join(f"{short} {values[c]}" for c, short in zip(CATEGORIES, ("CLS", "CODE", "QA", "GEN", "MATH", "SUM")))

    boot, p = s["bootstrap"]["diagonal_dominance"], s["permutation"]["p_value"]
    field = [
        "isn: neuron_active [4, 256], 120 instructions",
        f"  |S(c)|            {per_cat(s['per_category_count'])}",
        f"  unique            {per_cat(s['unique'])}",
        f"  general / union   {s['general']} / {s['union']}",
        f"  diagonal          {s['diagonal_dominance']:.3g} [{boot['low']:.3g}, {boot['high']:.3g}] (95% bootstrap), "
        f"permutation p {p:.3g}",
        f"  |S(c)| contrast   {per_cat(s['contrast']['per_category_count'])} "
        "(absolute threshold=0.5, consensus q=0.5)",
    ]
    assert repr(analysis).splitlines() == [
        "ModelAnalysis 'base': top eps=0.02 (ties keep), consensus q=0.5; model '/models/tiny', dtype 'float32', "
        "scope 'content', template 'plain'",
        *("  " + line for line in field),
        "  every figure: .summary() (keys in docs/analysis.md)",
    ]
    assert repr(analysis["isn"]).splitlines() == ["FieldAnalysis " + field[0], *field[1:]]
    ident = analysis["isn"].ident
    assert repr(ident).splitlines() == [
        "Identification: neuron_active, units [4, 256] (1,024 in all), 120 instructions",
        "  rule              top eps=0.02 (ties keep), consensus q=0.5",
        f"  |S(c)|            {per_cat(s['per_category_count'])}",
        "  instruction sets  dropped",
    ]

    def loss_fn(mask):  # each category's loss grows with the units switched off in its own first layer
        return {c: 1.0 + (0.0 if mask is None else 0.01 * (i + 1) * float(mask[0].sum()))
                for i, c in enumerate(CATEGORIES)}

    ablation = ablate_identification(ident, loss_fn, n_random=4, seed=3)
    own, sd = np.diag(ablation.excess), np.diag(ablation.excess_spread()["std"])
    assert repr(ablation).splitlines() == [
        "AblationResult: neurons, 4 matched random draws (seed 3)",
        f"  set sizes         {per_cat(dict(zip(CATEGORIES, ablation.set_sizes)))}",
        "  own-category loss increase beyond random, mean ± sd over draws (nats per response token):",
        "    " + ", ".join(f"{short} {e:+.3g} ± {d:.2g}"
                           for short, e, d in zip(("CLS", "CODE", "QA", "GEN", "MATH", "SUM"), own, sd)),
    ]


def test_encoded_records_display_a_summary_not_every_token():
    from sparcom_jax.data import DataWarning

    records = sj.load_instructions(n_per_category=2, seed=0)
    with pytest.warns(DataWarning, match="truncated"):
        enc = sj.encode_records(records, sj.default_tokenizer(), template="plain", scope="prompt", max_length=64)
    n = enc.lengths
    assert repr(enc) == (f"EncodedSet: 12 records (CLS 2, CODE 2, QA 2, GEN 2, MATH 2, SUM 2), template 'plain', "
                         f"scope 'prompt', {n.min()}-{n.max()} tokens (mean {n.mean():.0f}), "
                         f"{enc.n_truncated} truncated")
    assert enc.n_truncated > 0 and n.max() == 64


IMPORTS = textwrap.dedent("""
    import sys
    import sparcom_jax as sj
    for name in sj.__all__:
        getattr(sj, name)
    from sparcom_jax.report import export_sets, write_json  # writing the sets draws nothing
    print("LOADED:" + ",".join(m for m in ("torch", "matplotlib") if m in sys.modules))
""")


def test_the_public_names_import_neither_torch_nor_matplotlib(tmp_path):
    # torch is a test-only reference; matplotlib is needed only to draw a report.
    (tmp_path / "imports.py").write_text(IMPORTS)
    r = subprocess.run([sys.executable, str(tmp_path / "imports.py")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "LOADED:" in r.stdout.splitlines(), r.stdout


def test_loading_records_leaves_the_callers_datasets_progress_bars_as_they_were():
    import datasets

    before = datasets.is_progress_bar_enabled()
    try:
        for setting in (True, False):
            (datasets.enable_progress_bars if setting else datasets.disable_progress_bars)()
            assert len(sj.load_instructions(n_per_category=1)) == 6
            assert datasets.is_progress_bar_enabled() is setting
    finally:
        (datasets.enable_progress_bars if before else datasets.disable_progress_bars)()


def test_collection_and_the_loss_take_records_as_dicts(monkeypatch):
    # A notebook's own records are dicts; they are checked and encoded like a file's.
    import sparcom_jax.stats.collect as collect
    import sparcom_jax.stats.losses as losses

    rows = [{"id": f"{c}-1", "category": c.upper()[:4], "instruction": f"A {c} task.", "output": "Done."}
            for c in ("code", "math")]
    seen = {}
    monkeypatch.setattr(collect, "collect_counts", lambda model, seqs, scopes, batch_size, **kw: seen.update(kw))
    monkeypatch.setattr(collect, "check_scope_coverage", lambda enc, max_length: {})
    collect.collect_instructions(None, rows, sj.default_tokenizer())
    assert seen["ids"] == ["code-1", "math-1"] and seen["categories"] == ["code", "math"]
    monkeypatch.setattr(losses, "CategoryLoss", lambda model, enc, **kw: enc)
    assert losses.make_loss_fn(None, rows, sj.default_tokenizer()).categories == ["code", "math"]
    with pytest.raises(ValueError, match="records:item 2: duplicate id 'code-1'"):
        collect.collect_instructions(None, [rows[0], rows[0]], sj.default_tokenizer())


def test_analysing_counts_without_categories_says_how_to_give_them():
    # collect_counts over bare token ids is the README's low-level entry point; its counts
    # cannot be analysed by category, and the error names the two ways to give categories.
    counts = sj.Counts(tokens=np.array([4, 4], np.int32), neuron_active=np.ones((2, 1, 8), np.int32))
    with pytest.raises(ValueError, match=r"no per-instruction categories.*collect_instructions\(model, records\).*"
                                         r"categories=\[one category per sequence\] to collect_counts"):
        sj.analyze_model(counts)


def test_a_comparison_displays_its_headline_figures_and_stays_a_plain_dict():
    import dataclasses
    import json

    from sparcom_jax.analysis import IdentifyConfig, compare_models

    before = _study_counts()
    moved = before.neuron_active.copy()
    moved[:, 0] = np.roll(moved[:, 0], 7, axis=-1)  # layer 0's neurons change, the others stay
    after = dataclasses.replace(before, neuron_active=moved)
    cfg = IdentifyConfig(eps=0.02, aggregation="pooled", threshold=0.25)
    comparison = compare_models(before, after, cfg, names=("base", "tuned"), n_boot=3, n_perm=9)
    isn, diag = comparison["isn"], comparison["moves"]["isn"]["diagonal_dominance"]

    def per_cat(key, fmt=str):
        return ", ".join(f"{short} {fmt(isn[c][key])}"
                         for c, short in zip(sj.CATEGORIES, ("CLS", "CODE", "QA", "GEN", "MATH", "SUM")))

    contrast = ", ".join(f"{short} {isn[c]['contrast']['size_before']}->{isn[c]['contrast']['size_after']}"
                         for c, short in zip(sj.CATEGORIES, ("CLS", "CODE", "QA", "GEN", "MATH", "SUM")))
    assert repr(comparison).splitlines() == [
        "Comparison 'base' -> 'tuned': top eps=0.02 (ties keep), pooled",
        "  isn",
        f"    |S(c)| before     {per_cat('size_before')}",
        f"    |S(c)| after      {per_cat('size_after')}",
        f"    retained          {per_cat('retained')}",
        f"    gained            {per_cat('gained')}",
        f"    lost              {per_cat('lost')}",
        f"    jaccard           {per_cat('jaccard', lambda v: 'n/a' if v is None else f'{v:.3g}')}",
        f"    diagonal          {diag['before']:.3g} -> {diag['after']:.3g}",
        f"    |S(c)| contrast   {contrast} (absolute threshold=0.25, pooled)",
        "  every number: the dict's keys (docs/analysis.md)",
    ]
    assert 0 < isn["code"]["retained"] < isn["code"]["size_before"] == isn["code"]["retained"] + isn["code"]["lost"]
    assert isinstance(comparison, dict) and json.loads(json.dumps(comparison)) == comparison


def test_a_figure_shows_inline_in_a_notebook_without_pyplot():
    # IPython shows a Figure by its _repr_png_ unless pyplot's inline backend registered a
    # formatter; the report's figures never import pyplot, so they carry their own.
    import struct

    from sparcom_jax.report import figures

    fig = figures.overlap_heatmaps({"base": np.eye(6).tolist(), "tuned": np.eye(6).tolist()}, "overlap")
    png = fig._repr_png_()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", png[16:24]) == tuple(round(v * 100) for v in fig.get_size_inches())


def test_a_model_displays_its_counted_widths_and_how_it_runs(hf_checkpoint):
    # flax's own repr is the tree of every weight (about 100 lines) with the config on one line.
    import json

    from sparcom_jax.models.config import ModelConfig

    path = hf_checkpoint("llama")
    model = sj.load_model(path, with_tokenizer=False)
    assert str(model).splitlines() == repr(model).splitlines() == [
        f"CausalLM llama: 2 layers, hidden 32, vocab 96; {_n_params('llama'):,} parameters (float32)",
        "  FFN               48 neurons per layer (silu)",
        "  runs              compute float32, gate float32; attention blocked on cpu",
        f"  from              {path}; no tokenizer (pass tokenizer= to collect)",
        "  every weight: nnx.display(model); the architecture: model.config",
    ]
    hf = json.loads((hf_checkpoint("qwen2_moe") / "config.json").read_text())
    moe = sj.abstract_model(ModelConfig.from_hf_config(hf), dtype="bfloat16", gate_dtype="float32")
    assert repr(moe).splitlines() == [
        f"CausalLM qwen2_moe: 2 layers, hidden 32, vocab 96; {_n_params('qwen2_moe'):,} parameters (bfloat16)",
        "  experts           4 per layer, top-2 (not renormalised), 16 neurons each",
        "  shared expert     40 neurons per layer (silu)",
        f"  runs              compute bfloat16, gate float32; attention blocked on cpu; {moe.moe_dispatch}",
        "  from              no directory (abstract, no weights); the shipped tokenizer",
        "  every weight: nnx.display(model); the architecture: model.config",
    ]


def _n_params(variant: str) -> int:
    """The parameters of a tiny test checkpoint, counted by transformers (an independent count)."""
    from hf_fixtures import make_torch_model

    return sum(p.numel() for p in make_torch_model(variant).parameters())


def test_counts_say_what_their_collection_compiled():
    # A notebook user re-running a cell wants to see whether it compiled again.
    counts = _study_counts()
    counts.meta.update(tokens_per_s=1234.5, compilations={"compilations": 3, "cache_hits": 1, "compile_seconds": 2.04})
    assert repr(counts).splitlines()[4:] == [
        "  collected at 1,234 tokens/s; 3 XLA program(s) compiled, 1 loaded from the on-disk cache (2.0 s)",
        "  in memory",
    ]


def test_the_progress_bar_says_a_first_batch_may_be_compiling():
    # A notebook's first collection sits at 0 % while XLA compiles; the bar says why until a batch is done.
    from sparcom_jax.stats.collect import _Progress

    bar = _Progress(100, True, "collect")
    assert bar.bar.postfix == "first batch: compiling the forward for new shapes"
    assert "first batch: compiling" in str(bar.bar)
    bar(0)  # a batch with no counted tokens leaves the note
    assert bar.bar.postfix == "first batch: compiling the forward for new shapes"
    bar(40)
    assert not bar.bar.postfix and "compiling" not in str(bar.bar) and "40.0/100" in str(bar.bar)
    bar.close(0.1)


def test_a_missing_section_names_the_ones_there_are():
    # A dense model has no "ise" (a Mixtral no "isn"); a bare KeyError('ise') said nothing.
    analysis = sj.analyze_model(_study_counts(n_per_category=2), name="base", n_boot=2, n_perm=9)
    with pytest.raises(KeyError, match=r"'base' has no section 'ise'; it has \['isn'\]\. Sections: 'isn' "
                                       r"\(neuron_active\), 'ise' \(expert_routed\), 'expert_neurons' "
                                       r"\(expert_neuron_active\)"):
        analysis["ise"]
    assert analysis["isn"] is analysis.fields["isn"]


def test_a_series_displays_its_trends_and_stays_a_plain_dict():
    import dataclasses
    import json

    from sparcom_jax.analysis import IdentifyConfig, compare_series

    first = _study_counts(n_per_category=4)
    moved = first.neuron_active.copy()
    moved[:, 0] = np.roll(moved[:, 0], 7, axis=-1)
    items = [("step0", first), ("step1", first), ("final", dataclasses.replace(first, neuron_active=moved))]
    series = compare_series(items, IdentifyConfig(eps=0.02, aggregation="pooled"), n_boot=2, n_perm=9)
    t = series["isn"]
    shorts = ("CLS", "CODE", "QA", "GEN", "MATH", "SUM")
    sizes = ", ".join(f"{s} {'->'.join(map(str, t['per_category_count'][c]))}" for c, s in zip(sj.CATEGORIES, shorts))
    jac = ", ".join(f"{s} {'->'.join(f'{v:.3g}' for v in t['vs_base']['jaccard'][c])}"
                    for c, s in zip(sj.CATEGORIES, shorts))
    assert repr(series).splitlines() == [
        "SeriesComparison over 3 checkpoints: step0, step1, final",
        "  isn",
        f"    |S(c)|            {sizes}",
        f"    jaccard vs first  {jac}",
        f"    diagonal          {'->'.join(f'{v:.3g}' for v in t['diagonal_dominance'])}",
        "  every number: the dict's keys (docs/analysis.md)",
    ]
    assert t["vs_base"]["jaccard"]["code"][:2] == [1.0, 1.0] and t["vs_base"]["jaccard"]["code"][2] < 1
    assert isinstance(series, dict) and json.loads(json.dumps(series)) == series


def test_arguments_in_the_wrong_place_are_refused_with_the_fix():
    # The slips of a first session: two models' counts in one call, the rule's eps given bare or as a
    # keyword, a section name for a count field. Each failed with an AttributeError from deep inside.
    from sparcom_jax.analysis import identify

    counts, other = _study_counts(n_per_category=2, L=2, F=16), _study_counts(n_per_category=2, L=2, F=16)
    compare = "pass the two analyses to sj.compare_models"
    with pytest.raises(TypeError, match=f"second argument is the rule .* got a second Counts; .*{compare}"):
        sj.analyze_model(counts, other)
    with pytest.raises(TypeError, match=f"counts must be one model's Counts .* got list; .*{compare}"):
        sj.analyze_model([counts, other])
    with pytest.raises(TypeError, match=r"got float 0.05; pass sj.IdentifyConfig\(eps=0.05\)"):
        sj.analyze_model(counts, 0.05)
    with pytest.raises(TypeError, match=r"'eps'; eps belong\(s\) to the rule: pass sj.IdentifyConfig\(eps=0.05\)"):
        sj.analyze_model(counts, eps=0.05, n_boot=3)
    with pytest.raises(ValueError, match="unknown count field 'isn' .*its field is 'neuron_active'.* have neuron_active"):
        sj.analyze_model(counts, fields=["isn"])
    with pytest.raises(TypeError, match=f"identify: got a second Counts where the count field goes; .*{compare}"):
        identify(counts, other)
    with pytest.raises(ValueError, match="no 'expert_routed' .*; they have neuron_active"):
        identify(counts, "expert_routed")
    assert sj.analyze_model(counts, None, n_boot=0, n_perm=0, fields=["neuron_active"])["isn"].ident.n == 12


def test_comparing_models_of_different_shapes_names_both_and_the_fix():
    # A llama against a Qwen2-MoE (both have "isn": dense / shared-expert neurons) failed with
    # "models differ in units: (6, 2, 48) vs (6, 2, 40)", the category axis mixed into the shapes.
    small, wide = _study_counts(n_per_category=2, L=2, F=8), _study_counts(n_per_category=2, L=2, F=12)
    wide.meta = {**wide.meta, "model_type": "qwen2_moe"}
    rule = sj.IdentifyConfig(eps=0.1)
    before = sj.analyze_model(small, rule, name="base", n_boot=0, n_perm=0)
    after = sj.analyze_model(wide, rule, name="tuned", n_boot=0, n_perm=0)
    with pytest.raises(ValueError, match=r"^'base' \(isn \[2, 8\]\) and 'tuned' \(qwen2_moe, isn \[2, 12\]\) "
                                         r"differ in units: .*the model it was fine-tuned from"):
        sj.compare_models(before, after)


def test_records_with_their_own_column_names_are_pointed_to_load_instructions():
    # A DataFrame with its own column names passed straight to collect_instructions: the error said
    # "map the columns ... with fields=", which collect_instructions does not take (fields= gave the same error).
    import pandas as pd

    frame = pd.DataFrame({"prompt": ["Add 2 and 3."], "task": ["math"], "answer": ["5"]})
    hint = (r"\(collect_instructions reads records with load_instructions' defaults; for fields=, category_map= "
            r"or its other options call sj.load_instructions\(...\) first and pass the Records it returns\)$")
    with pytest.raises(ValueError, match=r"^records: missing required column\(s\) .*fields=.*" + hint):
        sj.collect_instructions(None, frame, sj.default_tokenizer())
    with pytest.raises(ValueError, match=hint.replace("collect_instructions", "make_loss_fn")):
        sj.make_loss_fn(None, frame, sj.default_tokenizer())
    fields = {"instruction": "prompt", "category": "task", "output": "answer"}
    assert sj.load_instructions(frame, fields=fields)[0].category == "math"  # the way the hint names


def test_a_missing_or_unfinished_store_names_the_python_call_that_makes_it(tmp_path):
    # open_counts told a notebook user to "run `sparcom collect` first", a command they never used.
    from sparcom_jax.stats.store import CountStore

    with pytest.raises(ValueError, match=r"no count store here \(meta.json missing\); make one with "
                                         r"sj.collect_instructions\(model, records, out=...\) or `sparcom collect`"):
        sj.open_counts(tmp_path)
    counts = _study_counts(n_per_category=1, L=1, F=4)
    CountStore(tmp_path / "s", {"tokens": (6,), "neuron_active": (6, 1, 4)}, ids=counts.ids,
               categories=counts.categories, meta=counts.meta, chunk_rows=3).close()  # no chunk written
    with pytest.raises(ValueError, match=r"has not finished; run the same sj.collect_instructions or collect_counts "
                                         r"call \(same out=\) or `sparcom collect` command again to resume it"):
        sj.open_counts(tmp_path / "s")


def test_the_causal_check_takes_a_section_of_an_analysis_and_names_it_for_a_whole_one():
    # ablate_identification(analysis["isn"], ...) and (analysis, ...) failed with
    # "AttributeError: 'FieldAnalysis' object has no attribute 'sets'".
    from sparcom_jax.analysis import ablate_identification
    from sparcom_jax.categories import CATEGORIES

    analysis = sj.analyze_model(_study_counts(n_per_category=2, L=2, F=16), sj.IdentifyConfig(eps=0.1),
                                n_boot=0, n_perm=0)

    def loss_fn(mask):  # each category's loss grows with the units switched off in its own first layer
        return {c: 1.0 + (0.0 if mask is None else 0.01 * (i + 1) * float(mask[0].sum()))
                for i, c in enumerate(CATEGORIES)}

    section = ablate_identification(analysis["isn"], loss_fn, n_random=2, seed=3)
    np.testing.assert_array_equal(section.excess, ablate_identification(analysis["isn"].ident, loss_fn,
                                                                        n_random=2, seed=3).excess)
    with pytest.raises(TypeError, match=r"pass analysis\[section\].ident for one of the analysis' sections "
                                        r"\('isn'\), e.g. analysis\['isn'\].ident; got ModelAnalysis"):
        ablate_identification(analysis, loss_fn)


def test_counts_collected_in_memory_can_be_saved_as_a_store_and_read_back(tmp_path):
    # Without out= a collection's counts lived only in the notebook's memory: keeping them meant
    # collecting again into a store.
    counts = _study_counts(n_per_category=2, L=2, F=8)
    counts.neuron_act_sum = np.random.default_rng(0).random(counts.neuron_active.shape).astype(np.float32)
    path = sj.save_counts(counts, tmp_path / "saved")
    back = sj.open_counts(path)
    for field in ("tokens", "neuron_active", "neuron_act_sum"):
        np.testing.assert_array_equal(getattr(back, field)[:], getattr(counts, field))
        assert getattr(back, field)[:].dtype == getattr(counts, field).dtype
    assert (back.ids, back.categories, back.sources) == (counts.ids, counts.categories, counts.sources)
    assert {k: v for k, v in back.meta.items() if k != "store"} == counts.meta  # its fingerprint too
    with pytest.raises(StaleResultError, match="a count store is already here; .*overwrite=True"):
        sj.save_counts(counts, path)
    half = _study_counts(n_per_category=1, L=2, F=8)
    sj.save_counts(sj.open_counts(path), tmp_path / "copy")  # lazily read counts save too
    sj.save_counts(half, path, overwrite=True)
    assert sj.open_counts(path).n == 6


def test_saving_counts_over_a_store_of_the_same_counts_replaces_it_and_refuses_its_own_source(tmp_path):
    # overwrite=True over a store of the same counts raised "RuntimeError: chunks must be written in
    # order: expected 1, got 0" (the matching store was resumed as complete), and so did saving counts
    # read lazily from the target itself.
    counts = _study_counts(n_per_category=1, L=2, F=8)
    path = sj.save_counts(counts, tmp_path / "saved")
    sj.save_counts(counts, path, overwrite=True)
    np.testing.assert_array_equal(sj.open_counts(path).neuron_active[:], counts.neuron_active)
    with pytest.raises(ValueError, match="read from this store, which overwrite=True would remove"):
        sj.save_counts(sj.open_counts(path), path, overwrite=True)
    assert sj.open_counts(path).n == counts.n  # the refusal left the store whole
    import json
    import os
    import socket

    from sparcom_jax.errors import LockedError

    # Another live process writing the store: refused, not removed under it.
    (path / ".sparcom.lock").write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname()}))
    with pytest.raises(LockedError, match="another run is writing this count store"):
        sj.save_counts(counts, path, overwrite=True)
    assert sj.open_counts(path).n == counts.n


def test_saving_counts_with_overwrite_clears_under_the_writers_own_lock(tmp_path, monkeypatch):
    # save_counts(overwrite=True) cleared under a lock of its own and released it before the
    # store's writer took the lock again: a writer that got in between left a store that the
    # save then refused (StaleResultError) instead of replacing it.
    from sparcom_jax.stats import store

    counts, other = _study_counts(n_per_category=1, L=2, F=8), _study_counts(n_per_category=2, L=2, F=8)
    path = sj.save_counts(counts, tmp_path / "saved")
    real, intruded = store.CountStore, []

    class Intruded(real):
        def __init__(self, *a, **k):
            if not intruded:  # another writer, just before this one takes the lock
                intruded.append(1)
                sj.save_counts(other, path, overwrite=True)
            super().__init__(*a, **k)

    monkeypatch.setattr(store, "CountStore", Intruded)
    sj.save_counts(counts, path, overwrite=True)
    assert intruded and sj.open_counts(path).n == counts.n


def test_saving_lazily_read_counts_reads_and_writes_them_a_chunk_at_a_time(tmp_path, monkeypatch):
    # Each array was written as one zarr chunk of all N rows (every later row read read the whole
    # array) from one read of the whole source.
    import tensorstore as ts

    from sparcom_jax.stats import store

    counts = _study_counts(n_per_category=1, L=2, F=8)
    src = sj.save_counts(counts, tmp_path / "src", chunk_rows=4)
    rows_read = []
    read = store.LazyArray.__getitem__
    monkeypatch.setattr(store.LazyArray, "__getitem__",
                        lambda self, idx: rows_read.append(len(r := read(self, idx))) or r)
    out = sj.save_counts(sj.open_counts(src), tmp_path / "copy", chunk_rows=4)
    assert max(rows_read) == 4 and sum(rows_read) == 2 * counts.n  # tokens and neuron_active, once
    monkeypatch.undo()
    for path in (src, out):
        layout = ts.open(store._spec(path / "neuron_active"), open=True).result().chunk_layout
        assert layout.read_chunk.shape[0] == 4
    np.testing.assert_array_equal(sj.open_counts(out).neuron_active[:], counts.neuron_active)
    assert store.read_header(out)["chunk_rows"] == 4


def test_help_on_the_package_names_every_public_name():
    # help(sparcom_jax) listed four functions: a first session could not find analyze_model there.
    import re

    documented = set(re.findall(r"[A-Za-z_]+", sj.__doc__))
    assert [name for name in sj.__all__ if name not in documented] == []


def test_a_comparison_of_some_categories_shows_the_missing_ones_as_missing():
    # A comparison over three categories displayed "GEN 0" etc. for the three it had no records of,
    # which reads as "no specific units before or after".
    from sparcom_jax.stats.counts import Counts

    rng = np.random.default_rng(0)
    names = ["classification", "code", "general_qa"] * 2
    rule = sj.IdentifyConfig(eps=0.2)
    before, after = (sj.analyze_model(Counts(tokens=np.full(6, 10, np.int32), categories=names, ids=list("abcdef"),
                                             neuron_active=rng.integers(0, 11, (6, 2, 8)).astype(np.int32)),
                                      rule, name=name, n_boot=0, n_perm=0) for name in ("base", "tuned"))
    comparison = sj.compare_models(before, after)
    assert [comparison["isn"][c]["n_instructions"] for c in sj.CATEGORIES] == [2, 2, 2, 0, 0, 0]
    lines = repr(comparison).splitlines()
    size = comparison["isn"]["code"]["size_before"]
    assert any(line.startswith("    |S(c)| before ") and f"CODE {size}, " in line
               and line.endswith("GEN -, MATH -, SUM -") for line in lines)
    assert "    no instructions   GEN, MATH, SUM (shown as -)" in lines


def test_a_series_of_some_categories_shows_the_missing_ones_as_missing():
    # compare_series over three categories displayed "GEN 0->0" sizes and "GEN n/a->n/a" Jaccards
    # for the three it had no records of, and its dict did not say which categories were measured.
    from sparcom_jax.stats.counts import Counts

    rng = np.random.default_rng(0)
    names = ["classification", "code", "general_qa"] * 2
    rule = sj.IdentifyConfig(eps=0.2)
    steps = [sj.analyze_model(Counts(tokens=np.full(6, 10, np.int32), categories=names, ids=list("abcdef"),
                                     neuron_active=rng.integers(0, 11, (6, 2, 8)).astype(np.int32)),
                              rule, name=name, n_boot=0, n_perm=0) for name in ("step0", "step1", "final")]
    series = sj.compare_series(steps)
    t = series["isn"]
    assert [t["n_instructions"][c] for c in sj.CATEGORIES] == [2, 2, 2, 0, 0, 0]
    lines = repr(series).splitlines()
    sizes = "->".join(map(str, t["per_category_count"]["code"]))
    assert any(line.startswith("    |S(c)| ") and f"CODE {sizes}, " in line
               and line.endswith("GEN -, MATH -, SUM -") for line in lines), lines
    assert any(line.startswith("    jaccard vs first ") and line.endswith("GEN -, MATH -, SUM -") for line in lines)
    assert "    no instructions   GEN, MATH, SUM (shown as -)" in lines


def test_a_series_takes_analyses_under_their_names_and_refuses_repeated_names():
    # compare_series([a, b]) failed with "KeyError: 'base' has no section 0" (the pair unpacking
    # indexed the analysis).
    rule = sj.IdentifyConfig(eps=0.1)
    base, tuned = (sj.analyze_model(_study_counts(n_per_category=1, L=1, F=8), rule, name=name, n_boot=0, n_perm=0)
                   for name in ("base", "tuned"))
    series = sj.compare_series([base, tuned])
    assert series["names"] == ["base", "tuned"]
    assert series == sj.compare_series([("base", base), ("tuned", tuned)])
    with pytest.raises(ValueError, match=r"checkpoint names repeat \(\['base', 'base'\]\); name each analysis"):
        sj.compare_series([base, base])
    with pytest.raises(TypeError, match="item 1 is a list; give each checkpoint as a ModelAnalysis"):
        sj.compare_series([base, ["tuned", tuned]])


def test_a_mesh_that_is_not_a_mesh_is_named_with_how_to_build_one(tmp_path):
    # load_model(path, mesh="auto") failed with "AttributeError: 'str' object has no attribute 'shape'".
    build = r"mesh must be a jax.sharding.Mesh .* sj.make_mesh\(data=..., model=...\), or None for one device; got "
    with pytest.raises(TypeError, match=f"^load_model: {build}str 'auto'$"):
        sj.load_model(tmp_path / "absent", mesh="auto")
    cfg = sj.ModelConfig(model_type="llama", vocab_size=16, hidden_size=8, num_layers=1, num_heads=2,
                         num_kv_heads=1, head_dim=4, intermediate_size=8)
    model = sj.init_model(cfg)
    with pytest.raises(TypeError, match=f"^collect_counts / make_loss_fn: {build}int 8$"):
        sj.collect_counts(model, [np.array([1, 2, 3])], mesh=8, progress=False)
    with pytest.raises(TypeError, match=f"^finetune: {build}tuple"):
        sj.finetune(model, [], None, sj.TrainConfig(), tmp_path / "run", mesh=(1, 1))


def test_a_random_model_saved_and_loaded_back_counts_with_the_tokenizer_it_showed(tmp_path):
    # sj.save_model(sj.init_model(cfg), DIR) wrote no tokenizer, though the model's display said it
    # uses "the shipped tokenizer": loaded back, every collection refused it ("no tokenizer beside
    # the weights ...; download the model's tokenizer files into it too").
    cfg = sj.ModelConfig(model_type="llama", vocab_size=4096, hidden_size=16, num_layers=1, num_heads=2,
                         num_kv_heads=1, head_dim=8, intermediate_size=16)
    model = sj.init_model(cfg, seed=3)
    assert "the shipped tokenizer" in repr(model)
    loaded = sj.load_model(sj.save_model(model, tmp_path / "m"))
    assert loaded.tokenizer is not None and loaded.tokenizer.get_vocab() == sj.default_tokenizer().get_vocab()
    records = sj.load_instructions(n_per_category=1)
    here, back = (sj.collect_instructions(m, records, progress=False) for m in (model, loaded))
    np.testing.assert_array_equal(here.neuron_active, back.neuron_active)
    # A model read from a directory without tokenizer files is saved without one, as before.
    bare = sj.save_model(sj.load_model(tmp_path / "m", with_tokenizer=False), tmp_path / "bare")
    assert sorted(p.name for p in bare.iterdir()) == ["config.json", "model.safetensors"]


def test_a_notebooks_slips_with_records_rules_and_stores_are_named_with_the_fix(tmp_path):
    # One record dict for a list was read as file names ("category: no such file or directory");
    # eps="1%" failed with "'<' not supported between instances of 'float' and 'str'"; a run's
    # folder given to open_counts said "no count store here; make one", with its stores below it.
    one = {"category": "math", "instruction": "What is 2 + 2?", "output": "4"}
    with pytest.raises(ValueError, match=r"^records: one record \(dict\) where a list of records or a file is "
                                         r"expected; pass a list of them, \[record\]$"):
        sj.load_instructions(one)
    assert len(sj.load_instructions([one])) == 1
    with pytest.raises(ValueError, match=r"^eps must be a number, a share of 1 \(0\.01 for 1 %\), got '1%'$"):
        sj.IdentifyConfig(eps="1%")
    assert sj.IdentifyConfig(eps=np.float32(0.5)).eps == 0.5
    run = tmp_path / "run"
    (run / "counts").mkdir(parents=True)
    (run / "config.yaml").write_text("name: x\n")
    sj.save_counts(_study_counts(2, L=1, F=8), run / "counts" / "base")
    with pytest.raises(ValueError, match=rf"^{run}: no count store here \(meta\.json missing\); the stores "
                                         rf"{run}/counts/base are below it: open one, sj\.open_counts\("
                                         rf"'{run}/counts/base'\), or the whole run: sj\.open_run\('{run}'\)$"):
        sj.open_counts(run)
    with pytest.raises(ValueError, match=r"no count store here \(meta\.json missing\); make one with "):
        sj.open_counts(tmp_path / "elsewhere")
    assert sj.open_counts(run / "counts" / "base").categories == _study_counts(2, L=1, F=8).categories
