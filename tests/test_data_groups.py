"""Near-duplicate groups (data.group_by: near): brute-force pairs, chained groups, the split,
the configuration and what runs made under another grouping are told."""

import json
import warnings

import pytest

from sparcom_jax.categories import CATEGORIES
from sparcom_jax.config import ConfigError, DataSpec, ExperimentConfig, apply_overrides, from_dict
from sparcom_jax.data import DataWarning, Record
from sparcom_jax.data.splits import (
    group_ids, group_key, group_keys, grouping_summary, near_pairs, near_words, split_records,
)

CLS, MATH = "classification", "math"


def rec(i, cat, text):
    return Record(id=f"r{i}", category=cat, instruction=text)


# Word sets (numbers alike): 0-1 differ by one word (Jaccard 5/7), 1-2 by a number (6/7), 2-3
# share 6 of 10 words (exactly 0.6; 1-3 6/9, 0-3 5/10); 4 shares nothing; 5 is 0's text in MATH;
# 6 and 7 have no words (different texts); 8 is 2 with another number, case and spacing.
TEXTS = [(CLS, "Find the mean of the data set."), (CLS, "Find the median of the data set."),
         (CLS, "Find the median of the data set 12."), (CLS, "Find the median of data set, cats dogs birds."),
         (CLS, "Is this review positive?"), (MATH, "Find the mean of the data set."),
         (CLS, "?!"), (CLS, "..."), (CLS, "Find the MEDIAN of  the data set 3.5.")]


def records():
    return [rec(i, c, t) for i, (c, t) in enumerate(TEXTS)]


def brute_pairs(recs, threshold):
    out = []
    for i in range(len(recs)):
        for j in range(i + 1, len(recs)):
            a, b = near_words(recs[i]), near_words(recs[j])
            if recs[i].category == recs[j].category and (a | b) and len(a & b) >= threshold * len(a | b) - 1e-12:
                out.append((i, j))
    return out


def test_near_words_lower_case_and_numbers_alike():
    assert near_words(rec(0, CLS, "Calculate 12% of 450.")) == near_words(rec(1, CLS, "calculate 3.25%  of 7"))
    assert near_words(rec(0, CLS, "Solve 3x")) == {"solve", "3x"}  # a number inside a word stays


@pytest.mark.parametrize("threshold", [1.0, 0.6, 0.5, 0.3])
@pytest.mark.parametrize("chunk", [2, 1024])
def test_near_pairs_brute_force(threshold, chunk):
    recs = records()
    assert near_pairs(recs, threshold, chunk=chunk) == brute_pairs(recs, threshold)
    if threshold == 0.6:  # the pair at exactly 0.6 is in; the other category's copy and word-less texts are not
        assert (2, 3) in brute_pairs(recs, 0.6) and (0, 5) not in brute_pairs(recs, 0.0) and (6, 7) not in \
            near_pairs(recs, 0.01)


def test_near_groups_chain_and_keep_their_first_record_s_text():
    recs = records()
    near = group_keys(recs, "near", 0.6)
    assert near[:4] == [group_key(recs[0])] * 4 and near[8] == near[0]  # 0-1-2-3 chained, 8 = 2 in words
    assert near[4] == group_key(recs[4]) and near[5] == group_key(recs[5])  # alone; MATH keeps its own group
    assert near[6] != near[7]
    assert group_keys(recs, "near", 0.7)[3] == group_key(recs[3])  # 2-3 at 0.6 only
    text = group_keys(recs)  # the functions' default: identical text (case and spacing ignored)
    assert text == [group_key(r) for r in recs] and len(set(text)) == len(recs) - 1  # 0 and 5: one text
    assert group_ids(recs, "near", 0.6)[1] == group_ids(recs, "near", 0.6)[3] != group_ids(recs)[1]
    with pytest.raises(ValueError, match="group_by='words'"):
        group_keys(recs, "words")
    with pytest.raises(ValueError, match=r"group_threshold=0: a Jaccard in \(0, 1\]"):
        group_keys(recs, "near", 0)


def test_a_near_threshold_of_one_joins_equal_word_sets_only_even_of_one_word():
    # (0, 1] includes 1: records 2 and 8 have one word set (numbers alike), 1 and 2 differ by one.
    recs = records()
    near = group_keys(recs, "near", 1.0)
    assert near[8] == near[2] == group_key(recs[2]) and near[1] == group_key(recs[1])
    with pytest.raises(ValueError, match=r"group_threshold=1.01: a Jaccard in \(0, 1\]"):
        group_keys(recs, "near", 1.01)
    # one-word instructions: a union of one word is a pair when the word is shared
    one_word = [rec(0, CLS, "Summarize."), rec(1, CLS, "summarize"), rec(2, CLS, "Translate.")]
    assert near_pairs(one_word, 1.0) == [(0, 1)]
    assert grouping_summary([])["largest_near_group"] == 0


def test_the_near_split_keeps_templated_variants_in_one_part():
    # Per category: five variants of one template (differing by a word or a number) and five
    # distinct instructions. Grouped by text, the variants are dealt out one by one.
    words = ["mean", "median", "mode", "range", "sum"]
    recs = []
    for c in CATEGORIES:
        recs += [Record(f"{c}-t{i}", c, f"Find the {w} of the {10 + i} numbers below.") for i, w in enumerate(words)]
        recs += [Record(f"{c}-d{i}", c, t) for i, t in enumerate(
            ["Name a colour.", "Why is the sky blue?", "Translate 'cat' into French.", "Sort these words.",
             "Write a limerick about tea."])]
    fractions = {"a": 0.5, "b": 0.5}
    for c in CATEGORIES:
        near = split_records(recs, fractions, seed=0, by="near", threshold=0.6)
        parts = {name for name, part in near.items() for r in part if r.id.startswith(f"{c}-t")}
        assert len(parts) == 1, c
    by_text = split_records(recs, fractions, seed=0)
    assert any(len({n for n, part in by_text.items() for r in part if r.id.startswith(f"{c}-t")}) == 2
               for c in CATEGORIES)
    s = grouping_summary(recs, "near", 0.6)
    assert s["text_groups"]["total"] == 60 and s["near_groups"] == {**dict.fromkeys(CATEGORIES, 6), "total": 36}
    assert (s["near_reworded"], s["largest_near_group"], s["records"], s["group_by"]) == (30, 5, 60, "near")


def test_config_validates_the_grouping_at_load():
    assert (DataSpec().group_by, DataSpec().group_threshold) == ("near", 0.6)
    for bad in ({"group_threshold": 0}, {"group_threshold": 1.5}):
        with pytest.raises(ConfigError, match="group_threshold"):
            from_dict(DataSpec, bad)
    with pytest.raises(ConfigError, match="group_by"):
        from_dict(DataSpec, {"group_by": "words"})


def _cfg(*overrides):
    tiny = dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    return apply_overrides(from_dict(ExperimentConfig, {"name": "g", "base": {"name": "base", "init": tiny}}),
                           list(overrides))


def test_runs_made_under_another_grouping_are_refused(tmp_path):
    from sparcom_jax.fingerprint import digest, write_fingerprint
    from sparcom_jax.pipeline.common import model_list, record_parts, train_records
    from sparcom_jax.pipeline.provenance import collect_fingerprint, stale

    near, text = _cfg(), _cfg("data.group_by=text")
    assert record_parts(near)[1]["grouped_by"].startswith("near-duplicate instructions (word Jaccard >= 0.6")
    assert record_parts(text)[1]["grouped_by"] == "identical instruction text"
    # A checkpoint tuned on the text-grouped train part is refused under near grouping.
    assert {r.id for r in train_records(text)} != {r.id for r in train_records(near)}
    out = tmp_path / "run"
    write_fingerprint(out / "train", "finetune", {"records": digest([r.id for r in train_records(text)])})
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "series.json").write_text(json.dumps([{"name": "ft", "step": 1, "path": "/ck"}]))
    assert [s.label for s in model_list(text, out)] == ["base", "ft"]
    with pytest.raises(ConfigError, match=r"fine-tuned on other records than the train part .*data\.group_by"):
        model_list(near, out)
    # Counts collected under identical-text groups (no "grouping" in their fingerprint, as every store
    # made before the option) are refused under near grouping, naming the setting.
    recs = record_parts(near)[0]["identify"][:6]
    old, _ = collect_fingerprint(text, text.base, recs, "plain")
    new, _ = collect_fingerprint(near, near.base, recs, "plain")
    assert "grouping" not in old
    from sparcom_jax.errors import StaleResultError

    with pytest.raises(StaleResultError, match=r"data\.group_by, data\.group_threshold\): unset -> 'near >= 0.6'"):
        stale("counts/base", old, new, overwrite=False)
    assert collect_fingerprint(_cfg("data.group_threshold=0.7"), near.base, recs, "plain")[0]["grouping"] \
        == "near >= 0.7"


def test_the_data_section_and_page_report_the_groups():
    from sparcom_jax.pipeline.common import identify_records
    from sparcom_jax.pipeline.stages import data_description
    from sparcom_jax.report.writer import _grouping_text

    cfg = _cfg("data.n_per_category=null")
    g = data_description(cfg)["grouping"]
    assert g == grouping_summary(identify_records(cfg), "near", 0.6)
    assert g["near_groups"]["total"] < g["text_groups"]["total"] <= g["records"]
    page = _grouping_text(g)
    assert page.startswith(f"Near-duplicates: the {g['records']} analysed records form {g['text_groups']['total']} "
                           f"groups of identical instruction text and {g['near_groups']['total']} groups of")
    assert "(data.group_by: near)" in page
    assert f"{g['near_reworded']} records share their group with another wording" in page
    off = _grouping_text(grouping_summary(identify_records(cfg), "text", 0.6))
    assert f"grouped by identical instruction text only (data.group_by: text), {g['text_groups']['total']}" in off
    assert f"the near-duplicate rule would give {g['near_groups']['total']} groups" in off
    assert _grouping_text(None) == ""


def test_a_train_file_with_a_near_duplicate_of_an_analysed_record_is_refused(tmp_path):
    import dataclasses

    from sparcom_jax.pipeline.common import record_parts, train_records

    held = record_parts(_cfg())[0]["identify"][0]
    variant = dataclasses.replace(held, id="variant", instruction=held.instruction.rstrip(".?!") + " please.")
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(vars(variant)) + "\n", encoding="utf-8")
    assert [r.id for r in train_records(_cfg(f"train_data.path={path}", "data.group_by=text"))] == ["variant"]
    with pytest.raises(ConfigError, match=r"train_data shares 1 instruction\(s\) \(or near-duplicates.*e\.g\. variant"):
        train_records(_cfg(f"train_data.path={path}"))


def test_the_report_page_says_how_the_records_group(tmp_path):
    import html

    from test_report_controls import dense_counts

    from sparcom_jax.analysis import IdentifyConfig, analyze_model, build_summary
    from sparcom_jax.report import write_report

    base = analyze_model(dense_counts(0), IdentifyConfig(eps=0.1), name="base", n_boot=0, n_perm=0)
    g = grouping_summary(records(), "near", 0.6)
    write_report(tmp_path, build_summary({"base": base}, data={"grouping": g}), dpi=30)
    page = html.unescape((tmp_path / "index.html").read_text())
    assert "Near-duplicates: the 9 analysed records form 9 groups of identical instruction text and 5 groups" in page


def test_the_pair_search_runs_once_per_record_texts_and_threshold(monkeypatch):
    """A run groups one record set many times (split, each model's counts, the report): the
    quadratic search runs once for the same texts, categories and threshold, and again when
    any of them changes."""
    from sparcom_jax.data import splits

    calls = []
    monkeypatch.setattr(splits, "_PAIRS_CACHE", {})
    real = splits._near_links  # the search group_keys and grouping_summary run (near_pairs lists every pair)
    monkeypatch.setattr(splits, "_near_links", lambda recs, keys, t: calls.append(t) or real(recs, keys, t))
    recs = records()
    keys = group_keys(recs, "near")
    assert group_ids(recs, "near") == group_ids(recs, "near") and grouping_summary(recs)["records"] == len(recs)
    assert calls == [0.6] and group_keys(recs, "near") == keys
    group_keys(recs, "near", 0.5)
    edited = [*recs[:-1], rec(8, CLS, "Translate this sentence into French.")]
    assert group_keys(edited, "near") != keys  # the edited text is a group of its own now
    relabelled = [*recs[:-1], rec(8, MATH, TEXTS[8][1])]
    group_keys(relabelled, "near")
    assert calls == [0.6, 0.5, 0.6, 0.6]


def test_a_split_that_leaves_a_part_without_a_category_is_refused(tmp_path):
    # A user's templated JSONL (each category one near-duplicate group) once went whole into
    # the identify part: `sparcom run` then ran the causal check over 0 held-out records and
    # wrote a matrix of None and 0.0 without a word; with the shares swapped, collect said
    # "no records to collect counts for; load at least one record per category".
    from sparcom_jax.pipeline.common import ablate_records, identify_records
    from sparcom_jax.pipeline.plan import memory_plan

    path = tmp_path / "mine.jsonl"
    path.write_text("".join(json.dumps({"id": f"{c}{k}", "category": c, "output": "ok",
                                        "instruction": f"Please do {c} task number {k} with alpha beta"}) + "\n"
                            for c in CATEGORIES for k in range(5)))
    near = _cfg(f"data.path={path}", "data.split={identify: 0.8, ablate: 0.2}", "data.max_length=64")
    assert len(identify_records(near)) == 30
    msg = (r"mine\.jsonl: data\.split \{'identify': 0\.8, 'ablate': 0\.2\} leaves the 'ablate' part without a "
           r"record of 6 categories .*classification: 5 record\(s\) in 1 group\(s\) \(identify 5, ablate 0\).* "
           r"or group less \(a higher data\.group_threshold, or data\.group_by: text\)")
    with pytest.raises(ConfigError, match=msg):
        ablate_records(near)
    with pytest.raises(ConfigError, match=msg):  # the dry run stops as the run would
        memory_plan(near, "ablate")
    memory_plan(apply_overrides(near, ["ablation.enabled=false"]), "ablate")  # no causal check, no ablate part needed
    swapped = apply_overrides(near, ["data.split={ablate: 0.8, identify: 0.2}"])
    with pytest.raises(ConfigError, match="leaves the 'identify' part without a record of 6 categories"):
        identify_records(swapped)
    # Grouped by identical text, every category has 4 + 1 records in the two parts.
    text = apply_overrides(near, ["data.group_by=text"])
    assert {r.category for r in ablate_records(text)} == set(CATEGORIES) and len(identify_records(text)) == 24


def test_a_category_with_no_record_is_said_once_when_the_records_are_read(tmp_path):
    # Under data.lenient, a file whose QA label was misspelt lost every QA record to the
    # skipped list, and the study went on with five categories: QA's rows stayed empty without
    # a word before the report.
    from sparcom_jax.data import DataWarning
    from sparcom_jax.pipeline.common import identify_records

    path = tmp_path / "five.jsonl"
    rows = [{"id": f"{c}{k}", "category": c, "output": "ok", "instruction": f"Item {k} of {c} {'x' * k}."}
            for c in CATEGORIES for k in range(5)]
    path.write_text("".join(json.dumps(dict(r, category="qa_open") if r["category"] == "general_qa" else r) + "\n"
                            for r in rows))
    cfg = _cfg(f"data.path={path}", "data.lenient=true", "data.group_by=text", "data.split=null")
    with pytest.warns(DataWarning) as got:
        assert len(identify_records(cfg)) == 25
    said = [str(w.message) for w in got if "no record of" in str(w.message)]
    assert said == [f"{path}: no record of QA (general_qa): the study covers 5 of the 6 categories, and the sets, "
                    "rows and columns of QA stay empty"]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))  # every category: nothing to say
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)
        assert len(identify_records(cfg)) == 30


def reference_pairs(recs, threshold):
    """Every pair of one category whose word sets have a union and an intersection of at least
    threshold * union, with the 1e-9 slack the rule has always had (0.7 * 10 is 7.000000000000001)."""
    words = [near_words(r) for r in recs]
    return [(i, j) for i in range(len(recs)) for j in range(i + 1, len(recs))
            if recs[i].category == recs[j].category and len(words[i] | words[j])
            and len(words[i] & words[j]) >= threshold * len(words[i] | words[j]) - 1e-9]


def test_near_pairs_edge_cases_keep_their_rule():
    """Pinned on the all-pairs search before the similarity join replaced it: word-less texts never
    pair with each other; a threshold of 1 pairs equal word sets only; 7 of 10 words is 0.7; and at a
    threshold below 1e-9 / union the slack lets disjoint word sets (a word-less text too) pair."""
    recs = [rec(0, CLS, "?!"), rec(1, CLS, "..."), rec(2, CLS, "a b"), rec(3, CLS, "B a 1"), rec(4, CLS, "b A 22"),
            rec(5, CLS, "c"), rec(6, CLS, "a b c d e f g h i j"), rec(7, CLS, "a b c d e f g"),
            rec(8, MATH, "a b")]
    assert near_pairs(recs, 1.0) == [(3, 4)]
    assert near_pairs(recs, 0.7) == [(3, 4), (6, 7)] == reference_pairs(recs, 0.7)
    assert near_pairs(recs, 0.5) == [(2, 3), (2, 4), (3, 4), (6, 7)]
    tiny = near_pairs(recs, 1e-10)
    assert (0, 1) not in tiny and {(0, 2), (0, 5), (2, 5), (5, 6)} <= set(tiny) and tiny == reference_pairs(recs, 1e-10)
    assert near_pairs(recs, 1e-3) == [p for p in reference_pairs(recs, 1e-3)] and (0, 5) not in near_pairs(recs, 1e-3)
    assert near_pairs([], 0.6) == [] and near_pairs(recs[:1], 1e-10) == []
    for bad in (0, 1.5, float("nan")):  # outside the rule's range: refused, not an empty list
        with pytest.raises(ValueError, match=r"group_threshold=.*: a Jaccard in \(0, 1\]"):
            near_pairs(recs, bad)


@pytest.mark.parametrize("seed", range(6))
def test_near_pairs_equal_brute_force_on_random_records(seed):
    """Random record sets over small vocabularies: many ties in word frequency and set size,
    repeated and word-less texts, thresholds at and between the fractions small sets make."""
    import numpy as np

    rng = np.random.default_rng(seed)
    vocab = [f"w{k}" for k in range(int(rng.integers(3, 12)))] + ["7", "42"]  # numbers are one word
    recs = []
    for i in range(int(rng.integers(20, 60))):
        n = int(rng.integers(0, 8))
        text = " ".join(rng.choice(vocab, size=n).tolist()) or "?"  # no words: "?"
        recs.append(rec(i, [CLS, MATH][int(rng.random() < 0.3)], text))
    recs += [rec(len(recs) + k, r.category, r.instruction) for k, r in enumerate(recs[:5])]  # duplicates
    for threshold in (1.0, 0.75, 0.7, 2 / 3, 0.6, 0.5, 0.4, 1 / 3, 0.1, 1e-10, float(rng.uniform(0.05, 1))):
        assert near_pairs(recs, threshold) == reference_pairs(recs, threshold), threshold


def test_each_process_of_a_collection_keeps_the_groups_of_all_records(tmp_path, monkeypatch):
    """Process k of P counts records k, k+P, ... (its share) and stores their group ids. A chain of
    near-duplicates 0-1-2 (0 and 2 alone are not near) straddles the shares of two processes: found
    over one share, 0 and 2 would be two groups in process 0, and 1 a third in process 1."""
    import jax
    import numpy as np

    from sparcom_jax.parallel import processes
    from sparcom_jax.pipeline import stages
    from sparcom_jax.pipeline.common import group_records
    from sparcom_jax.stats import collect

    chain = [TEXTS[0][1], TEXTS[1][1], TEXTS[3][1]]  # Jaccard 0-1 5/7, 1-2 6/9, 0-2 5/10
    texts = [(CLS, t) for t in chain] + [(c, f"Name a {c} example.") for c in CATEGORIES[1:]]
    every = [Record(f"r{i}", c, t) for i, (c, t) in enumerate(texts)]
    cfg = _cfg("data.scope=prompt")  # prompt: no content caps to tokenize
    whole = group_records(cfg, every)
    assert whole[0] == whole[1] == whole[2] != group_records(cfg, every[0::2])[2]  # the case under test

    class Counted(Exception):
        pass

    stored = {}

    def collect_instructions(model, records, tokenizer, *, groups, **kwargs):
        stored[jax.process_index()] = ([r.id for r in records], groups)
        raise Counted

    monkeypatch.setattr(collect, "collect_instructions", collect_instructions)
    monkeypatch.setattr(stages, "load_spec_model", lambda *a, **k: None)  # no weights: nothing is counted
    monkeypatch.setattr(stages, "identify_records", lambda cfg: every)
    monkeypatch.setattr(stages, "collect_fingerprint", lambda *a, **k: ({"model": "m", "sums": False}, None))  # no tokenizer
    monkeypatch.setattr(stages, "resolve_tokenizer", lambda model: None)
    monkeypatch.setattr(stages, "barrier", lambda name: None)
    monkeypatch.setattr(processes, "gather", lambda x: np.stack([np.atleast_1d(x)] * 2))  # both processes alike
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    for k in range(2):
        monkeypatch.setattr(jax, "process_index", lambda k=k: k)
        with pytest.raises(Counted):
            stages.collect_stage(cfg, tmp_path / "out", progress=False)
    for k in range(2):
        assert stored[k] == ([f"r{i}" for i in range(k, len(texts), 2)], whole[k::2])


def reference_groups(recs, threshold):
    """group_keys(recs, "near", threshold) by brute force: identical text and every `reference_pairs`
    pair joined, each group keyed by the text of its earliest record."""
    label = list(range(len(recs)))
    edges = reference_pairs(recs, threshold) + [
        (i, j) for i in range(len(recs)) for j in range(i + 1, len(recs))
        if recs[i].category == recs[j].category and group_key(recs[i]) == group_key(recs[j])]
    changed = True
    while changed:  # label propagation to the smallest index of each component
        changed = False
        for i, j in edges:
            if label[i] != label[j]:
                label[i] = label[j] = min(label[i], label[j])
                changed = True
    return [group_key(recs[label[i]]) for i in range(len(recs))]



def reference_reworded(recs, threshold):
    """grouping_summary's near_reworded by brute force: records with another text in their group."""
    groups = [(r.category, k) for r, k in zip(recs, reference_groups(recs, threshold))]
    return sum(any(groups[j] == groups[i] and group_key(recs[j]) != group_key(recs[i]) for j in range(len(recs)))
               for i in range(len(recs)))

@pytest.mark.parametrize("seed", range(4))
def test_groups_and_pair_counts_equal_brute_force_with_many_repeated_word_sets(seed):
    """Grouping chains distinct word sets instead of listing every record pair: the groups, and
    the count of directly joined pairs of different texts, stay those of brute force when most
    records share their word set with others (number variants, repeated texts, word-less texts)."""
    import numpy as np

    rng = np.random.default_rng(100 + seed)
    vocab = [f"w{k}" for k in range(int(rng.integers(3, 8)))]
    templates = [" ".join(rng.choice(vocab, size=int(rng.integers(0, 6))).tolist()) for _ in range(6)]
    recs = []
    for i in range(int(rng.integers(30, 70))):
        # A template with a number or two (one word set, different texts), its bare text, or a word-less text.
        text = templates[int(rng.integers(len(templates)))] + " " + " ".join(
            str(int(x)) for x in rng.integers(0, 500, int(rng.integers(0, 3))))
        recs.append(rec(i, [CLS, MATH][int(rng.random() < 0.4)], text.strip() or ["?!", "...", "-"][i % 3]))
    recs += [rec(len(recs) + k, r.category, r.instruction.upper()) for k, r in enumerate(recs[:8])]  # same text
    for threshold in (1.0, 0.7, 0.6, 0.5, 1 / 3, 1e-10):
        assert group_keys(recs, "near", threshold) == reference_groups(recs, threshold), threshold
        assert grouping_summary(recs, "near", threshold)["near_reworded"] == reference_reworded(recs, threshold)


def test_grouping_links_grow_with_the_records_not_their_pairs(monkeypatch):
    """3,000 number variants of one template (one word set): 4.5 million record pairs, which the
    grouping once listed (minutes and GBs at 10,000 variants); it needs one link per record."""
    from sparcom_jax.data import splits

    n = 3000
    recs = [rec(i, MATH, f"Calculate {i}% of {3 * i + 7}.") for i in range(n)]
    recs += [rec(n, MATH, "calculate 5%  of 22."), rec(n + 1, MATH, "Name a prime."), rec(n + 2, CLS, "?!")]
    links = []
    real = splits._near_links
    monkeypatch.setattr(splits, "_PAIRS_CACHE", {})
    monkeypatch.setattr(splits, "_near_links", lambda *a: links.append(len(real(*a)[0])) or real(*a))
    keys = group_keys(recs, "near", 0.6)
    assert keys == [group_key(recs[0])] * (n + 1) + [group_key(recs[n + 1]), group_key(recs[n + 2])]
    s = grouping_summary(recs, "near", 0.6)
    # One group of n + 1 texts (record n repeats record 5's): every record has another wording beside it.
    assert s["near_reworded"] == n + 1 and s["largest_near_group"] == n + 1
    assert links == [n]  # one link per record but the set's first; the search ran once


def template_family_records(rng, n_templates):
    """Templates with free slots, as instruction sets have them: a core of common words and one
    or two slots, each filled by different words or phrases (some fillers are core words, some
    numbers), beside free texts and repeats over the same small vocabulary."""
    vocab = [f"w{k}" for k in range(int(rng.integers(4, 12)))]
    recs = []
    for t in range(n_templates):
        core = rng.choice(vocab, size=int(rng.integers(2, 10))).tolist()
        slots = sorted(rng.choice(len(core) + 1, size=int(rng.integers(1, 3))).tolist())
        cat = [CLS, MATH][t % 2]
        for k in range(int(rng.integers(3, 16))):
            fill = [" ".join(f"f{t}x{k}y{s}z{j}" if rng.random() < 0.8 else str(rng.choice(vocab + ["7"]))
                             for j in range(int(rng.integers(1, 4)))) for s in slots]
            words = list(core)
            for s, f in sorted(zip(slots, fill), reverse=True):
                words.insert(s, f)
            recs.append(rec(len(recs), cat, " ".join(words)))
    for _ in range(int(rng.integers(0, 15))):  # free texts (a word-less one too)
        recs.append(rec(len(recs), [CLS, MATH][int(rng.random() < 0.5)],
                        " ".join(rng.choice(vocab, size=int(rng.integers(0, 8))).tolist()) or "?!"))
    order = rng.permutation(len(recs))
    return [rec(i, recs[j].category, recs[j].instruction) for i, j in enumerate(order)]


@pytest.mark.parametrize("seed", range(8))
def test_groups_of_free_slot_templates_equal_brute_force(seed, monkeypatch):
    """Grouping checks only enough joined pairs of word sets to connect them (a template with k
    fillers of a free slot joins k (k - 1) / 2 pairs of distinct sets): the groups and the summary's
    pair count stay those of brute force, at every threshold, with chunks and batches of a few
    pairs (joins found in one batch skip later candidates) or of many."""
    import numpy as np

    from sparcom_jax.data import splits

    rng = np.random.default_rng(300 + seed)
    recs = template_family_records(rng, int(rng.integers(1, 5)))
    if seed % 2:
        monkeypatch.setattr(splits, "_CHUNK", int(rng.integers(1, 40)))
        monkeypatch.setattr(splits, "_BATCH", int(rng.integers(1, 8)))
    for threshold in (1.0, 0.75, 0.6, 0.5, 1 / 3, 1e-10, float(rng.uniform(0.05, 1))):
        monkeypatch.setattr(splits, "_PAIRS_CACHE", {})
        reference = reference_pairs(recs, threshold)
        assert group_keys(recs, "near", threshold) == reference_groups(recs, threshold), threshold
        assert grouping_summary(recs, "near", threshold)["near_reworded"] == reference_reworded(recs, threshold)
        links, _ = splits._near_links(recs, group_keys(recs, "text"), threshold)
        assert set(map(tuple, links.tolist())) <= {*reference, *((j, i) for i, j in reference)} | {
            (i, j) for i in range(len(recs)) for j in range(len(recs))
            if recs[i].category == recs[j].category and near_words(recs[i]) == near_words(recs[j])}  # real joins only


def test_a_free_word_slot_costs_about_one_check_per_filler(monkeypatch):
    """k fillers of one slot ("What is the capital of X?") are k distinct word sets, all k (k - 1) / 2
    pairs joined; so are k phrases of 1 to 3 words in a slot of a longer template. Grouping checked
    and generated every one of those pairs (minutes and 8 GB at k = 10,000); it needs about k."""
    import numpy as np

    from sparcom_jax.data import splits

    k = 400
    rng = np.random.default_rng(0)
    recs = [rec(i, CLS, f"What is the capital of c{i}?") for i in range(k)]
    recs += [rec(k + i, MATH, "Write a short poem for children about the "
                 + " ".join(f"p{i}x{j}" for j in range(int(rng.integers(1, 4))))) for i in range(k)]
    generated = []
    expand = splits._PrefixIndex.expand
    monkeypatch.setattr(splits._PrefixIndex, "expand", lambda self, *a: generated.append(a[2].sum()) or expand(self, *a))
    monkeypatch.setattr(splits, "_PAIRS_CACHE", {})
    links, checked = splits._near_links(recs, group_keys(recs, "text"), 0.6)
    assert group_keys(recs, "near", 0.6) == [group_key(recs[0])] * k + [group_key(recs[k])] * k
    assert checked < 3 * k and sum(generated) < 3 * k, (checked, sum(generated))
    assert len(links) < 2 * k


def _template_families(rng) -> list[frozenset[str]]:
    """Word sets of a few templates with slots beside free sets of common words, sorted."""
    vocab = [f"w{k}" for k in range(int(rng.integers(4, 9)))]
    sets = set()
    for t in range(int(rng.integers(1, 4))):
        core = set(rng.choice(vocab, size=int(rng.integers(2, 7))).tolist())
        for k in range(int(rng.integers(5, 30))):
            fill = {f"f{t}x{k}y{j}" if rng.random() < 0.7 else str(rng.choice(vocab))
                    for j in range(int(rng.integers(1, 4)))}
            sets.add(frozenset(core | fill))
    sets |= {frozenset(rng.choice(vocab, size=int(rng.integers(0, 7))).tolist()) for _ in range(20)}
    return sorted(sets, key=sorted)


def test_the_forest_of_word_sets_connects_what_all_joined_pairs_connect(monkeypatch):
    """`_set_forest` on many small families (templates with slots beside free sets of common words,
    so that probe words find large components and a few sets outside them): its pairs are joined
    pairs, and they connect exactly the sets that every joined pair connects (brute force)."""
    import numpy as np

    from sparcom_jax.data import splits

    for seed in range(40):
        rng = np.random.default_rng(500 + seed)
        sets = _template_families(rng)
        monkeypatch.setattr(splits, "_BATCH", int(rng.integers(1, 64)))
        for threshold in (0.75, 0.6, 0.5, 1 / 3, 0.2):
            joined = {(i, j) for i in range(len(sets)) for j in range(i + 1, len(sets)) if len(sets[i] | sets[j])
                      and len(sets[i] & sets[j]) >= threshold * len(sets[i] | sets[j]) - 1e-9}
            (u, v), _ = splits._set_forest(sets, threshold, int(rng.integers(1, 200)))
            assert set(zip(u.tolist(), v.tolist())) <= joined, (seed, threshold)

            def parts(pairs):  # each set's smallest connected set (union-find)
                parent = list(range(len(sets)))

                def root(i):
                    while parent[i] != i:
                        i = parent[i]
                    return i

                for i, j in pairs:
                    a, b = root(i), root(j)
                    parent[max(a, b)] = min(a, b)
                return [root(i) for i in range(len(sets))]

            assert parts(list(zip(u.tolist(), v.tolist()))) == parts(sorted(joined)), (seed, threshold)


def test_the_forest_checks_a_candidate_pair_found_twice_once(monkeypatch):
    """A pair found by several probe words (or by the template pass and the prefix pass) was checked
    again and, when joined, added again as an edge of the forest."""
    import numpy as np

    from sparcom_jax.data import splits

    checked_pairs = []
    joined = splits._PrefixIndex.joined
    monkeypatch.setattr(splits._PrefixIndex, "joined",
                        lambda self, x, y: checked_pairs.append(list(zip(x.tolist(), y.tolist()))) or joined(self, x, y))
    sets = _template_families(np.random.default_rng(522))  # a family that found repeats
    (u, v), checked = splits._set_forest(sets, 0.5, 50)
    assert all(len(set(c)) == len(c) for c in checked_pairs), checked_pairs
    assert len(set(zip(u.tolist(), v.tolist()))) == u.size and checked == sum(map(len, checked_pairs))


def test_the_grouping_summary_does_not_search_every_joined_pair(monkeypatch):
    """Every report's grouping summary counted the pairs the rule joins directly: k (k - 1) / 2 for a
    template slot of k fillers (over 60 s at k = 10,000 where the groups took 0.14 s)."""
    from sparcom_jax.data import splits

    monkeypatch.setattr(splits, "_PAIRS_CACHE", {})
    monkeypatch.setattr(splits, "_joined_chunks", lambda *a: pytest.fail("every joined pair searched"))
    recs = [rec(i, CLS, f"What is the capital of c{i}?") for i in range(30)] + [rec(30, CLS, "Name a prime.")]
    s = grouping_summary(recs, "near", 0.6)
    assert (s["near_reworded"], s["near_groups"]["total"], s["largest_near_group"]) == (30, 2, 30)


def _distinct_rows(k: int = 8) -> list[dict]:
    """k records of every category, every instruction its own and no near-duplicate of another."""
    return [{"id": f"{c}{i}", "category": c, "output": "ok", "instruction": f"{c} item {i} {'x' * i} {'y' * (9 - i)}"}
            for c in CATEGORIES for i in range(k)]


def test_a_run_says_once_that_a_text_is_under_two_categories_and_keeps_its_copies_in_one_part(tmp_path):
    # Three CLS texts copied under MATH: the stages read the records once, say it once, and the
    # train, identify and ablate parts never hold a text and its copy apart.
    from sparcom_jax.pipeline.common import ablate_records, identify_records, train_records

    rows = _distinct_rows()
    rows += [dict(rows[i], id=f"copy{i}", category=MATH) for i in range(3)]
    path = tmp_path / "copies.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    for seed in range(4):
        cfg = _cfg(f"data.path={path}", "data.split={train: 0.5, identify: 0.3, ablate: 0.2}",
                   f"data.split_seed={seed}", "data.n_per_category=null")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            part = {r.id: name for name, recs in [("train", train_records(cfg)), ("identify", identify_records(cfg)),
                                                  ("ablate", ablate_records(cfg))] for r in recs}
        said = [str(w.message) for w in caught if issubclass(w.category, DataWarning)]
        assert len(said) == 1 and said[0].startswith("3 instruction text(s) appear under two or more categories")
        assert f"'{CLS}0' ({CLS}, {path}:1) and 'copy0' ({MATH}, {path}:49)" in said[0]
        assert all(part[f"{CLS}{i}"] == part[f"copy{i}"] for i in range(3)), seed


def test_a_part_left_without_a_category_by_its_copies_says_so(tmp_path):
    # SUM holds only copies of CLS texts that went to identify: its records follow them, so the
    # ablate part has no SUM record, and the refusal says why.
    from sparcom_jax.pipeline.common import ablate_records

    rows = [r for r in _distinct_rows() if r["category"] != "summarization"]
    cls = [Record(**r) for r in rows if r["category"] == CLS]
    split = {"identify": 0.6, "ablate": 0.4}
    held = [r for r in split_records(cls, split, seed=0, by="near")["identify"]]
    rows += [{"id": f"s{i}", "category": "summarization", "output": "ok", "instruction": r.instruction}
             for i, r in enumerate(held)]
    path = tmp_path / "copies.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = _cfg(f"data.path={path}", "data.split={identify: 0.6, ablate: 0.4}", "data.n_per_category=null")
    with pytest.warns(DataWarning), pytest.raises(ConfigError, match=(
            rf"summarization: {len(held)} record\(s\) in {len(held)} group\(s\) \(identify {len(held)}, ablate 0\), "
            rf"{len(held)} of them with an instruction text under another category too, in that text's part")):
        ablate_records(cfg)


def test_the_data_section_and_page_count_the_copies_among_the_analysed_records():
    from sparcom_jax.report.writer import _grouping_text

    recs = records()  # TEXTS[5] is TEXTS[0]'s text under MATH
    clean = [r for r in recs if r.id != "r5"]
    copied = recs + [Record("again", CLS, TEXTS[0][1].upper()), Record("more", CLS, TEXTS[0][1])]
    counted = {name: (s["repeated_records"], s["cross_category_texts"], _grouping_text(s))
               for name, s in [("clean", grouping_summary(clean)), ("copied", grouping_summary(copied))]}
    assert counted["clean"][:2] == (0, 0) and "Copies" not in counted["clean"][2]
    assert counted["copied"][:2] == (2, 1)
    assert counted["copied"][2].endswith(
        " Copies: 2 analysed record(s) repeat another record of their category under another id (instruction, input "
        "and response alike): each copy counts as an instruction of its own in the sets, counts and overlaps (the "
        "bootstrap and permutation tests draw it with its original as one unit when they resample groups, "
        "identify.resample: group). Copies: 1 instruction text(s) appear under two or more categories: each counts "
        "as an instruction of each of its categories, which inflates their overlap and lowers their uniqueness (the "
        "split keeps such a text in one part).")
    old = {k: v for k, v in grouping_summary(copied).items() if k not in ("repeated_records", "cross_category_texts")}
    assert "Copies" not in _grouping_text(old)  # a summary made before copies were counted reads as before
