"""The environments of resumed work and what a change of each can affect, without a pipeline run:
`with_environment` and its readers (`environment_parts`, `part_ranges`, `parts_line`,
`output_parts`), the field rules (`MODEL_COMPUTE`, `TRAINING`, `READ_ONLY`) as docs/cli.md
states them, and `note_environment` / `note_mixed`.

Written against hand-made mutants of fingerprint.py and provenance.py that the first tests (the
pipeline runs of test_provenance.py among them) let through."""

from __future__ import annotations

import pytest

import sparcom_jax.fingerprint as F
from sparcom_jax.pipeline import provenance as P

# docs/cli.md, "What an environment change can affect": per reusing work, what can change a number.
BESIDE_NEW_COMPUTATION = {"jax", "jaxlib", "flax", "backend", "device_kind"}
RESUMED_TRAINING = BESIDE_NEW_COMPUTATION | {"optax", "numpy"}
NEVER = {"transformers", "tokenizers"}  # (they act through the tokens, which are fingerprinted)


@pytest.fixture(autouse=True)
def said_afresh(monkeypatch):
    """Each test starts with nothing said yet (what a process has logged is kept module-wide)."""
    monkeypatch.setattr(P, "_said", set())


def env(python="3.11.7", commit="0123456789abcdef", dirty=False, version="0.3.0", device_count=1, **values):
    """An environment as `F.environment` writes one; `values` set a package or backend / device_kind."""
    packages = {"jax": "0.10.1", "jaxlib": "0.10.1", "flax": "0.12.0", "optax": "0.2.5", "numpy": "2.3.0",
                "transformers": "4.57.0", "tokenizers": "0.22.0"}
    top = {"backend": "cpu", "device_kind": "cpu"}
    for k, v in values.items():
        (packages if k in packages else top)[k] = v
    src = {"version": version, **({"commit": commit, "dirty": dirty} if commit else {})}
    return {"python": python, "packages": packages, **top, "device_count": device_count, "sparcom_jax": src}


def changed(key):
    return env(**{key: "other"})


@pytest.mark.parametrize("key", sorted(RESUMED_TRAINING | NEVER))
def test_each_change_matters_where_the_docs_say_it_can_change_a_number(key, capsys):
    """Beside new model computation (`MODEL_COMPUTE`), in a resumed training run (`TRAINING`), and
    where finished outputs are only read (`READ_ONLY`): every change recorded, "matters" as the
    docs' table says, and only what matters is said."""
    for fields, can in ((P.MODEL_COMPUTE, BESIDE_NEW_COMPUTATION), (F.TRAINING, RESUMED_TRAINING),
                        (P.READ_ONLY, set())):
        out = f"out-{key}-{len(fields)}"
        entry = P.note_environment("stage", out, changed(key), current=env(), fields=fields)[0]
        assert (entry["package"], entry["old"], entry["matters"]) == (key, "other", key in can), fields
        assert (f"reusing {out}, made under other versions" in capsys.readouterr().err) == (key in can), fields


def test_an_output_that_recorded_no_environment_may_differ_in_anything_but_only_counts_where_something_can(capsys):
    for i, made_under in enumerate((None, [])):  # (one not recorded; output_parts of a record without one)
        (read,) = P.note_environment("identify", f"old-counts-{i}", made_under, current=env(), fields=P.READ_ONLY)
        assert {k: read[k] for k in F.UNRECORDED} == F.UNRECORDED and read["matters"] is False
        assert "old-counts" not in capsys.readouterr().err
        (beside,) = P.note_environment("ablate", f"old-store-{i}", made_under, made_by="collect", current=env(),
                                       fields=P.MODEL_COMPUTE)
        assert beside["matters"] is True and beside["stage"] == "collect"
        assert f"reusing old-store-{i}, made under other versions than this run's (" in capsys.readouterr().err


def test_the_changes_of_each_part_are_named_with_it_and_said_once(capsys):
    holder = F.with_environment({"environment": env(jax="0.9.0", numpy="1.26.0")}, env(), 2, "chunk")
    parts = P.output_parts(holder, 5)
    entries = P.note_environment("collect", "store-a", parts, current=env(), fields=P.MODEL_COMPUTE)
    assert [(e["part"], e["package"], e["matters"]) for e in entries] == [
        ("chunks 0-1", "jax", True), ("chunks 0-1", "numpy", False)]
    err = capsys.readouterr().err
    # (only what matters is named; a second stage reusing the same store does not say it again)
    assert "reusing store-a, made under other versions than this run's (jax 0.9.0 -> 0.10.1 (chunks 0-1))" in err
    assert "numpy" not in err
    P.note_environment("ablate", "store-a", parts, current=env(), fields=P.MODEL_COMPUTE)
    assert "store-a" not in capsys.readouterr().err
    # A change that does not matter alone: recorded, never said.
    quiet = P.note_environment("collect", "store-b", env(numpy="1.26.0"), current=env(), fields=P.MODEL_COMPUTE)
    assert [e["matters"] for e in quiet] == [False] and capsys.readouterr().err == ""


def test_output_parts_name_each_part_only_when_there_are_several():
    assert P.output_parts({"environment": env()}, 3) == [{"environment": env(), "from": 0}]
    steps = F.with_environment({"environment": env(jax="0.9.0")}, env(), 2, "step")
    assert [p["part"] for p in P.output_parts(steps, 3, first=1)] == ["steps 1-2", "step 3"]
    # The holder keeps what it recorded: the names are the reader's, not written back with it.
    assert all("part" not in p for p in steps["environments"])
    assert [p["part"] for p in P.output_parts(steps, 3, first=1)] == ["steps 1-2", "step 3"]


def test_fingerprint_files_keep_every_environment_and_its_part(tmp_path):
    parts = F.with_environment({"environment": env(jax="0.9.0")}, env(), 4, "step")["environments"]
    F.write_fingerprint(tmp_path, "finetune", {"x": 1}, made_under=env(jax="0.9.0"), environments=parts)
    whole = F.read_fingerprint(tmp_path, whole=True)
    assert whole["environment"] == env(jax="0.9.0") and F.environment_parts(whole) == parts
    F.write_fingerprint(tmp_path / "one", "finetune", {"x": 1}, made_under=env(), environments=None)
    assert F.environment_parts(F.read_fingerprint(tmp_path / "one", whole=True)) == [{"environment": env(), "from": 0}]


def test_part_ranges_of_one_unit_and_of_parts_without_a_unit_name():
    assert F.part_ranges([{"from": 0, "unit": "chunk"}, {"from": 1, "unit": "chunk"}], 3) == ["chunk 0", "chunks 1-2"]
    assert F.part_ranges(F.environment_parts({"environment": env()}), 3) == ["units 0-2"]


def test_parts_line_names_what_differs_python_devices_and_the_commit_included():
    """Three parts: by the device kind and count and by sparcom_jax's commit (a modified checkout
    said), listed "a, b and c"; without a commit, by the version."""
    parts = [{"environment": env(), "from": 0, "unit": "chunk"}, {"environment": env(dirty=True), "from": 2, "unit": "chunk"},
             {"environment": env(device_kind="TPU v5 lite", device_count=8, commit="fedcba9876543210"), "from": 3,
              "unit": "chunk"}]
    assert F.parts_line("counts", parts, F.part_ranges(parts, 6)) == (
        "counts made under device_kind cpu, devices 1, sparcom_jax 0123456789ab (chunks 0-1), "
        "device_kind cpu, devices 1, sparcom_jax 0123456789ab (modified) (chunk 2) and "
        "device_kind TPU v5 lite, devices 8, sparcom_jax fedcba987654 (chunks 3-5)")
    installed = [{"environment": env(commit=None, version="0.3.0", python="3.11.7"), "from": 0},
                 {"environment": env(commit=None, version="0.4.0", python="3.12.1"), "from": 1}]
    assert F.parts_line("train", installed, ["step 1", "step 2"]) == (
        "train made under python 3.11.7, sparcom_jax 0.3.0 (step 1) and python 3.12.1, sparcom_jax 0.4.0 (step 2)")


def test_note_mixed_counts_only_differences_among_the_outputs_and_says_them_once(capsys):
    """The outputs share a backend this process lacks (no number of theirs changes here) and differ
    in jax: jax matters, the backend does not; an output that recorded none matters, named."""
    tpu = {"backend": "tpu", "device_kind": "TPU v5 lite"}
    before, after = env(**tpu), env(jax="0.10.2", **tpu)
    outputs = [("collect", "counts/base", [{"environment": before}]), ("collect", "counts/tuned", [{"environment": after}])]
    entries = P.note_mixed("analyse", outputs, current=env(jax="0.10.2"))
    assert {(e["output"], e["package"], e["matters"]) for e in entries} == {
        ("counts/base", "jax", True), ("counts/base", "backend", False), ("counts/base", "device_kind", False),
        ("counts/tuned", "backend", False), ("counts/tuned", "device_kind", False)}
    err = capsys.readouterr().err
    assert "analyse: outputs set against each other here were made under different versions (counts/base: jax " \
           "0.10.1; counts/tuned: jax 0.10.2): the differences between them mix the two" in err
    assert "made under other versions than this run's" not in err  # (nothing new computed beside them)
    P.note_mixed("analyse", outputs, current=env(jax="0.10.2"))
    assert capsys.readouterr().err == ""  # said once
    # The same versions among them, another backend than this process's: recorded, nothing said.
    same = [("collect", "counts/base2", [{"environment": before}]), ("collect", "counts/tuned2", [{"environment": before}])]
    assert not any(e["matters"] for e in P.note_mixed("report", same, current=env()))
    assert capsys.readouterr().err == ""
    # An output that recorded none may differ in anything.
    unknown = P.note_mixed("report", [*same, ("ablate", "ablate/old.json", [])], current=env(**tpu))
    assert [(e["output"], e["matters"]) for e in unknown] == [("ablate/old.json", True)]
    assert "(ablate/old.json: not recorded): the differences" in capsys.readouterr().err


def test_a_value_one_output_did_not_record_counts_as_a_difference_among_them(capsys):
    """An environment recorded without the device kind (as an earlier sparcom_jax wrote them) may
    differ from the other output's: the change matters, as a whole environment not recorded does."""
    older = env()
    del older["device_kind"]
    outputs = [("collect", "counts/older", [{"environment": older}]), ("collect", "counts/newer", [{"environment": env()}])]
    entries = P.note_mixed("analyse", outputs, current=env())
    assert [(e["output"], e["package"], e["old"], e["matters"]) for e in entries] == [
        ("counts/older", "device_kind", None, True)]
    assert "(counts/older: device_kind None; counts/newer: device_kind cpu)" in capsys.readouterr().err
