"""Model weights are fingerprinted by content: a rewrite is another model whatever its size and
times, a moved or copied directory is the same model, and the per-file digests are cached by
the files' stat fields (ctime included) without ever failing on a damaged cache."""

import hashlib
import json
import os
import shutil
import time

import pytest

from sparcom_jax import fingerprint as F
from sparcom_jax.pipeline.provenance import LABELS, stale
from sparcom_jax.errors import StaleResultError


def model_dir(path, seed=0, shards=1, size=4096):
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 32}))
    for k in range(shards):
        (path / f"model-{k:05d}.safetensors").write_bytes(os.urandom(size) if seed is None
                                                          else bytes((seed + k + i) % 251 for i in range(size)))
    return path


@pytest.fixture
def cache(tmp_path, monkeypatch):
    d = tmp_path / "digests"
    monkeypatch.setenv(F.DIGEST_CACHE_ENV, str(d))
    return d


@pytest.fixture
def hashed(monkeypatch):
    """The files file_sha256 read, in order."""
    calls = []
    real = F.file_sha256

    def counting(path):
        calls.append(os.path.basename(path))
        return real(path)

    monkeypatch.setattr(F, "file_sha256", counting)
    return calls


def rewrite_keeping_size_and_mtime(f):
    st = f.stat()
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    with open(f, "r+b") as fh:  # in place: same inode
        fh.write(data)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (f.stat().st_size, f.stat().st_mtime_ns, f.stat().st_ino) == (st.st_size, st.st_mtime_ns, st.st_ino)


def test_weights_rewritten_at_one_size_with_the_mtime_restored_are_another_model(tmp_path, cache):
    d = model_dir(tmp_path / "m")
    before = F.model_files_fingerprint(d)
    rewrite_keeping_size_and_mtime(d / "model-00000.safetensors")
    assert F.model_files_fingerprint(d) != before


def test_a_cached_digest_is_not_reused_after_a_rewrite_that_restores_size_and_mtime(tmp_path, cache, hashed,
                                                                                     monkeypatch):
    # The digest is cached (files old enough), then the file is rewritten: only its ctime says so.
    monkeypatch.setattr(F, "SETTLE_NS", 0)
    d = model_dir(tmp_path / "m")
    time.sleep(0.05)  # past the filesystem's timestamp tick
    before = F.model_files_fingerprint(d)
    assert F.model_files_fingerprint(d) == before and len(hashed) == 2  # the second call was a cache hit
    time.sleep(0.05)
    rewrite_keeping_size_and_mtime(d / "model-00000.safetensors")
    assert F.model_files_fingerprint(d) != before
    assert hashed[2:] == ["model-00000.safetensors"]


def test_a_moved_or_copied_checkpoint_is_the_same_model(tmp_path, cache):
    d = model_dir(tmp_path / "a" / "hf", shards=2)
    fp = F.model_files_fingerprint(d)
    shutil.copytree(d, tmp_path / "b" / "copy")
    assert F.model_files_fingerprint(tmp_path / "b" / "copy") == fp
    os.rename(d, tmp_path / "moved")
    assert F.model_files_fingerprint(tmp_path / "moved") == fp
    # ...but not another model's weights, nor another config, nor a shard renamed
    assert F.model_files_fingerprint(model_dir(tmp_path / "c", seed=1, shards=2)) != fp
    (tmp_path / "moved" / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    assert F.model_files_fingerprint(tmp_path / "moved") != fp
    os.rename(tmp_path / "b" / "copy" / "model-00001.safetensors", tmp_path / "b" / "copy" / "x.safetensors")
    assert F.model_files_fingerprint(tmp_path / "b" / "copy") != fp


def test_a_cache_hit_does_not_read_the_file(tmp_path, cache, hashed, monkeypatch):
    monkeypatch.setattr(F, "SETTLE_NS", 0)
    d = model_dir(tmp_path / "m", shards=3)
    time.sleep(0.05)
    fp = F.model_files_fingerprint(d)
    assert sorted(hashed) == sorted(p.name for p in d.iterdir())
    hashed.clear()
    assert F.model_files_fingerprint(d) == fp and hashed == []
    # the cache is keyed by the resolved path: a copy is hashed once, then hit
    shutil.copytree(d, tmp_path / "copy")
    time.sleep(0.05)
    assert F.model_files_fingerprint(tmp_path / "copy") == fp and len(hashed) == 4
    assert F.model_files_fingerprint(tmp_path / "copy") == fp and len(hashed) == 4


def test_a_file_changed_just_before_hashing_is_not_cached(tmp_path, cache, hashed):
    # On a filesystem with coarse timestamps a rewrite in the same tick keeps every stat field.
    d = model_dir(tmp_path / "m")
    F.model_files_fingerprint(d)
    F.model_files_fingerprint(d)
    assert len(hashed) == 4 and not cache.exists()


def test_a_file_written_while_it_is_hashed_is_not_cached(tmp_path, cache, monkeypatch):
    monkeypatch.setattr(F, "SETTLE_NS", 0)
    d = model_dir(tmp_path / "m")
    time.sleep(0.05)
    real, calls = F.file_sha256, []

    def racing(path):
        calls.append(path)
        sha = real(path)  # what was read...
        if len(calls) == 1:
            time.sleep(0.05)
            rewrite_keeping_size_and_mtime(d / "model-00000.safetensors")  # ...is already stale
        return sha

    monkeypatch.setattr(F, "file_sha256", racing)
    F.file_digests([d / "model-00000.safetensors"])
    assert not cache.exists()
    assert F.file_digests([d / "model-00000.safetensors"]) == [real(d / "model-00000.safetensors")]


def test_a_damaged_or_unwritable_cache_is_hashed_around_never_an_error(tmp_path, cache, hashed, monkeypatch):
    monkeypatch.setattr(F, "SETTLE_NS", 0)
    d = model_dir(tmp_path / "m")
    time.sleep(0.05)
    fp = F.model_files_fingerprint(d)
    entries = sorted(cache.iterdir())
    assert len(entries) == 2
    entries[0].write_text("{not json")
    # the right stat fields, a cut digest (a hand-edited or foreign entry)
    entries[1].write_text(json.dumps(dict(json.loads(entries[1].read_text()), sha256="abc")))
    hashed.clear()
    assert F.model_files_fingerprint(d) == fp and len(hashed) == 2
    # repaired by that run: hits again
    assert F.model_files_fingerprint(d) == fp and len(hashed) == 2
    # a cache that cannot be written: a warning, the digest all the same
    shutil.rmtree(cache)
    cache.write_text("a file, not a directory")
    assert F.model_files_fingerprint(d) == fp


def test_digests_are_sha256_of_each_files_bytes_in_order(tmp_path, cache, monkeypatch):
    monkeypatch.setattr(F, "_CHUNK", 1000)  # several reads per file, the last one short
    d = model_dir(tmp_path / "m", seed=None, shards=4, size=4321)
    files = sorted(d.iterdir())
    assert F.file_digests(files) == [hashlib.sha256(f.read_bytes()).hexdigest() for f in files]


def test_hashing_a_large_directory_is_announced_once_with_size_and_time(tmp_path, cache, monkeypatch, capsys):
    monkeypatch.setattr(F, "SETTLE_NS", 0)
    monkeypatch.setattr(F, "ANNOUNCE_BYTES", 5000)
    d = model_dir(tmp_path / "m", shards=2, size=3000)
    time.sleep(0.05)
    F.model_files_fingerprint(d)
    err = capsys.readouterr().err
    assert f"hashing 0.0 GB of model weights in {d} (" in err and str(cache) in err
    assert "hashed 0.0 GB in " in err and "GB/s" in err
    F.model_files_fingerprint(d)  # cache hits: nothing to announce
    assert capsys.readouterr().err == ""


def test_an_output_fingerprinted_by_file_times_says_the_format_changed():
    old = {"model": "0123456789abcdef", "scope": "prompt"}
    new = {"model": F.WEIGHTS_DIGEST + "fedcba9876543210", "scope": "prompt"}
    with pytest.raises(StaleResultError) as e:
        stale("OUT/counts/m", old, new, overwrite=False)
    msg = str(e.value)
    assert "model weights changed, or were fingerprinted by an older sparcom_jax" in msg and "--overwrite" in msg
    # two content digests that differ: the weights changed, nothing more to say
    other = {"model": F.WEIGHTS_DIGEST + "0000000000000000", "scope": "prompt"}
    assert F.describe(["model"], other, new, LABELS) == "model weights changed"


def entry_names(cache):
    return sorted(p.name for p in cache.iterdir() if F._ENTRY_NAME.fullmatch(p.name))


def test_pruning_drops_the_entries_of_deleted_or_changed_files_and_keeps_the_rest(tmp_path, cache, hashed,
                                                                                 monkeypatch):
    monkeypatch.setattr(F, "SETTLE_NS", 0)
    d = model_dir(tmp_path / "m", shards=3)
    time.sleep(0.05)
    F.model_files_fingerprint(d)  # 4 entries (and a prune: nothing to drop)
    entry = {n: F._entry(cache, (d / n).resolve()).name for n in ("model-00000.safetensors",
                                                                    "model-00001.safetensors")}
    assert len(entry_names(cache)) == 4
    (cache / "notes.json").write_text("{}")  # not an entry: never touched
    old_tmp, new_tmp = cache / f".{'a' * 32}.json.x1.tmp", cache / f".{'b' * 32}.json.x2.tmp"
    for t in (old_tmp, new_tmp):
        t.write_text("{")
    os.utime(old_tmp, (time.time() - 2 * F.STALE_TEMP_S,) * 2)  # left by a killed writer
    (d / "model-00000.safetensors").unlink()
    time.sleep(0.05)
    rewrite_keeping_size_and_mtime(d / "model-00001.safetensors")
    checked = []
    real = F._current
    monkeypatch.setattr(F, "_current", lambda e: checked.append(e) or real(e))
    monkeypatch.setattr(F, "PRUNE_SAMPLE", 1)
    F.prune_digest_cache(cache)  # bounded: one entry read
    assert len(checked) == 1 and len(entry_names(cache)) >= 3
    F.prune_digest_cache(cache, everything=True)
    left = entry_names(cache)
    assert len(left) == 2 and entry["model-00000.safetensors"] not in left
    assert entry["model-00001.safetensors"] not in left
    assert (cache / "notes.json").exists() and new_tmp.exists() and not old_tmp.exists()
    hashed.clear()  # the kept entries still hit
    F.file_digests([d / "config.json", d / "model-00002.safetensors"])
    assert hashed == []


def test_the_cache_keeps_its_most_recently_used_entries_up_to_its_bound(tmp_path, cache, hashed, monkeypatch):
    monkeypatch.setattr(F, "SETTLE_NS", 0)
    monkeypatch.setattr(F, "MAX_ENTRIES", 2)
    files = {}
    for n in "abc":
        files[n] = tmp_path / n
        files[n].write_text(n)
    time.sleep(0.05)
    for n in "aba":  # b hashed after a, then a used again
        F.file_digests([files[n]])
        time.sleep(0.02)
    F.file_digests([files["c"]])  # a third entry: b, the least recently used, goes
    assert len(entry_names(cache)) == 2
    hashed.clear()
    F.file_digests([files[n] for n in "acb"])
    assert hashed == ["b"]


_CONCURRENT_WRITER = """
import os, sys, time
from pathlib import Path
from sparcom_jax import fingerprint as F
F.SETTLE_NS = 0
root, shared = Path(sys.argv[1]), sorted(Path(sys.argv[2]).iterdir())
for r in range(8):  # each round: new files hashed (entries written), last round's deleted (pruned)
    d = root / f"r{r}"
    d.mkdir(parents=True)
    for k in range(15):
        (d / f"f{k}").write_bytes(os.urandom(64))
    time.sleep(0.02)
    F.file_digests(sorted(d.iterdir()) + shared)
    if r:
        for f in (root / f"r{r - 1}").iterdir():
            f.unlink()
"""


def test_two_processes_hashing_and_pruning_at_once_lose_no_current_entry(tmp_path, cache, hashed, monkeypatch):
    import subprocess
    import sys

    shared = tmp_path / "shared"
    shared.mkdir()
    for k in range(5):
        (shared / f"s{k}").write_bytes(os.urandom(64))
    roots = [tmp_path / f"p{k}" for k in range(2)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    procs = [subprocess.Popen([sys.executable, "-c", _CONCURRENT_WRITER, str(r), str(shared)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in roots]
    outs = [p.communicate(timeout=120) for p in procs]
    assert outs == [("", "")] * 2 and [p.returncode for p in procs] == [0, 0]  # no "not cached" warning
    files = [f for r in roots for f in sorted((r / "r7").iterdir())] + sorted(shared.iterdir())
    hashed.clear()
    assert F.file_digests(files) == [hashlib.sha256(f.read_bytes()).hexdigest() for f in files]
    assert hashed == []  # every current file's entry survived the other process's prunes
    F.prune_digest_cache(cache, everything=True)
    assert len(entry_names(cache)) == len(files)  # and the deleted files' entries are gone
    assert not [p for p in cache.iterdir() if p.name.endswith(".tmp")]


def test_an_entry_another_process_rewrites_while_it_is_pruned_stays(tmp_path, cache, monkeypatch):
    monkeypatch.setattr(F, "SETTLE_NS", 0)
    f = tmp_path / "w"
    f.write_text("old")
    time.sleep(0.05)
    F.file_digests([f])
    entry = F._entry(cache, f.resolve())
    f.write_text("new")  # the entry is stale...
    time.sleep(0.05)
    real = F._current

    def judged_then_replaced(path):
        stale = real(path)
        real_f = f.resolve()  # ...and another writer replaces it before the prune removes it
        F._hash_and_cache(cache, real_f, F.stat_key(real_f.stat()))
        return stale

    monkeypatch.setattr(F, "_current", judged_then_replaced)
    F.prune_digest_cache(cache, everything=True)
    assert json.loads(entry.read_text())["sha256"] == hashlib.sha256(b"new").hexdigest()


def test_a_changed_settings_section_names_the_keys_that_changed():
    # `sparcom ablate` after identify.eps=0.02 said only "identify settings changed".
    old = {"identify": {"eps": 0.01, "q": 0.5, "rule": "top"}, "ablation": {"n_random": 2, "n_bins": 10}}
    new = {"identify": {"eps": 0.02, "q": 0.6, "rule": "top", "ties": "break"}, "ablation": dict(old["ablation"])}
    assert F.describe(["identify"], old, new, LABELS) == (
        "identify settings changed (eps: 0.01 -> 0.02, q: 0.5 -> 0.6, ties: unset -> 'break')")
    assert F.describe(["identify"], old, new, LABELS, limit=1) == "identify settings changed (eps: 0.01 -> 0.02, and 2 more)"
    assert F.difference(old, new) == ["identify"]


def test_a_store_refused_for_changed_tokens_names_the_records_that_changed(tmp_path):
    # The refusal said only "tokens changed": which of 1,200 records' text or tokens changed was
    # left to the user to find.
    import numpy as np

    from sparcom_jax.stats.store import CountStore

    ids = [np.array([5, 6, 7]), np.array([8, 9]), np.array([1, 2, 3, 4])]
    scopes = [np.ones(len(a), bool) for a in ids]
    labels = dict(ids=["a", "b", "c"], categories=["math", "code", "math"], meta={}, chunk_rows=2,
                  shapes={"tokens": (3,)})

    def store(seqs, masks):  # with a finished chunk: a store without one is made again, not refused
        s = CountStore(tmp_path / "s", **labels, fingerprint={"tokens": F.digest_arrays(seqs, masks)},
                       token_digests=F.record_digests(seqs, masks))
        s.write_chunk(0, {"tokens": np.array([3, 2])})
        s.close()

    store(ids, scopes)
    # The same tokens in another integer type are the same record.
    assert F.record_digests([a.astype(np.int32) for a in ids], scopes) == F.record_digests(ids, scopes)
    # one token of "b", and the scope (not the ids) of "c"
    edited = [ids[0], np.array([8, 10]), ids[2]]
    masks = [*scopes[:2], np.array([True, True, False, True])]
    with pytest.raises(StaleResultError, match=r"tokens changed \(2 of 3 records: 'b' \(code\), 'c' \(math\)\)"):
        store(edited, masks)
    many = [a + 1 for a in ids]
    assert F.changed_records({"ids": ["a", "b", "c"], "token_digests": F.record_digests(ids)},
                             {"ids": ["c", "a", "b"], "token_digests": F.record_digests([many[2], ids[0], many[1]])},
                             limit=1) == "2 of 3 records: 'c', and 1 more"
    # nothing to name: no digests kept (a store made before they were), or only the order changed
    assert F.changed_records({"ids": ["a"]}, {"ids": ["a"], "token_digests": F.record_digests(ids[:1])}) is None
    assert F.changed_records({"ids": ["a", "b"], "token_digests": F.record_digests(ids[:2])},
                             {"ids": ["b", "a"], "token_digests": F.record_digests(ids[1::-1])}) is None
    # 4 bytes per record, base64: the store's meta.json grows by about 5.3 bytes per record
    assert len(F.record_digests(ids * 100)) == 1600  # 300 records


def test_a_max_length_that_cut_nothing_more_leaves_counts_current(tmp_path):
    # data.max_length 512 -> 1024 with no record longer than 512 refused the counts and asked for a
    # recount that gives the same counts: the tokens, which hold every effect of max_length, matched.
    from sparcom_jax.stats.store import CountStore

    made = {"tokens": "a" * 16, "max_length": 512, "scope": "content"}
    assert not stale(tmp_path, made, {**made, "max_length": 1024}, overwrite=False)
    with pytest.raises(StaleResultError, match=r"data.max_length: 512 -> 256"):
        stale(tmp_path, made, {**made, "max_length": 256, "tokens": "b" * 16}, overwrite=False)
    with pytest.raises(StaleResultError, match=r"data.scope: 'content' -> 'all'"):  # only max_length goes
        stale(tmp_path, made, {**made, "max_length": 1024, "scope": "all"}, overwrite=False)
    labels = dict(ids=["a"], categories=["math"], meta={}, chunk_rows=1, shapes={"tokens": (1,)})
    s = CountStore(tmp_path / "s", **labels, fingerprint=made)
    s.write_chunk(0, {"tokens": [3]})  # counts to keep: a store without any is made again, not refused
    s.close()
    CountStore(tmp_path / "s", **labels, fingerprint={**made, "max_length": 1024}).close()  # resumed, not refused
    with pytest.raises(StaleResultError):
        CountStore(tmp_path / "s", **labels, fingerprint={**made, "max_length": 256, "tokens": "b" * 16})


def test_overwrite_recomputes_stale_outputs_and_says_why(tmp_path, capsys):
    """With --overwrite a difference is no error: `stale` answers True (recompute) and logs what
    differs; matching outputs are still reused, silently."""
    made = {"tokens": "a" * 16, "scope": "content"}
    assert stale(tmp_path, made, {**made, "scope": "all"}, overwrite=True) is True
    err = capsys.readouterr().err
    assert f"{tmp_path}: recomputing (--overwrite): data.scope: 'content' -> 'all'" in err
    assert stale(tmp_path, made, dict(made), overwrite=True) is False
    assert capsys.readouterr().err == ""


def test_details_given_as_a_function_are_computed_only_for_a_refusal(tmp_path):
    # Naming changed records hashes every record's tokens: every stage checks every store, and
    # computed before each check, the names cost that on runs where nothing changed.
    calls = []

    def details():
        calls.append(1)
        return {"tokens": "1 of 2 records: 'r1' (math)"}

    made = {"tokens": "a" * 16, "scope": "content"}
    assert not stale(tmp_path, made, dict(made), overwrite=False, details=details)
    assert calls == []
    with pytest.raises(StaleResultError, match=r"changed \(1 of 2 records: 'r1' \(math\)\)"):
        stale(tmp_path, made, {**made, "tokens": "b" * 16}, overwrite=False, details=details)
    assert calls == [1]


def test_an_in_memory_model_with_two_weights_swapped_is_another_model():
    """A model built in memory is fingerprinted by its parameters' values: two weights of one
    matrix swapped make another model. Sums of the values (and of their magnitudes), the
    checksum this had before, are the same for both (exactly, with these integer weights)."""
    import jax
    import numpy as np
    from flax import nnx

    from sparcom_jax.models.config import ModelConfig
    from sparcom_jax.models.transformer import abstract_model

    cfg = ModelConfig.from_hf_config(dict(model_type="llama", hidden_size=8, intermediate_size=16,
                                          num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                          max_position_embeddings=16, vocab_size=16))
    abstract = abstract_model(cfg)
    params = jax.tree.map(lambda s: (np.arange(s.size) % 7).reshape(s.shape).astype(np.float32),
                          nnx.to_pure_dict(nnx.state(abstract, nnx.Param)))

    def model(p):
        return nnx.merge(nnx.graphdef(abstract), nnx.State(jax.tree.map(jax.numpy.asarray, p)))

    w = jax.tree.leaves(params)[0]  # values 0, 1, 2, ...: elements 1 and 2 differ
    ref = F.model_fingerprint(model(params))
    assert F.model_fingerprint(model(params)) == ref
    swapped = w.copy().reshape(-1)
    swapped[[1, 2]] = swapped[[2, 1]]
    w[...] = swapped.reshape(w.shape)
    assert F.model_fingerprint(model(params)) != ref


def test_an_in_memory_model_of_another_architecture_with_the_same_weights_is_another_model():
    """Settings that change the outputs without changing any parameter's shape or value (the
    RoPE base, the norms' epsilon) make another model: the same seed draws the same weights."""
    import sparcom_jax as sj

    hf = dict(model_type="llama", hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
              num_key_value_heads=1, max_position_embeddings=16, vocab_size=16)
    digests = {F.model_fingerprint(sj.init_model(sj.ModelConfig.from_hf_config({**hf, **change}), seed=0))
               for change in ({}, {"rope_theta": 500.0}, {"rms_norm_eps": 1e-3})}
    assert len(digests) == 3


def test_a_damaged_fingerprint_file_differs_from_any_fingerprint_and_is_not_taken_for_none(tmp_path):
    """No fingerprint.json means nothing to check (e.g. exports whose run directory was removed:
    `check_checkpoints_current` passes them on); a damaged one must be refused, not passed on
    as if there were none."""
    assert F.read_fingerprint(tmp_path) is None
    for damaged in ("{not json", '{"stage": "finetune"}', "[1, 2]"):
        (tmp_path / F.FINGERPRINT_FILE).write_text(damaged)
        stored = F.read_fingerprint(tmp_path)
        assert stored is not None and F.stale_keys(stored, {"base": "b", "train": {}}) == ["base", "train"], damaged


def test_max_length_is_told_through_the_tokens_only_where_the_tokens_are_fingerprinted():
    """A causal-check result records data.max_length beside its held-out tokens, not "tokens":
    another max_length is stale there, though the same max_length change beside equal counted
    tokens is not."""
    assert F.stale_keys({"max_length": 48, "records": "r"}, {"max_length": 40, "records": "r"}) == ["max_length"]
    assert F.stale_keys({"max_length": 48, "tokens": "t"}, {"max_length": 40, "tokens": "t"}) == []
    assert F.stale_keys({"max_length": 48, "tokens": "t"}, {"max_length": 40, "tokens": "u"}) == ["max_length", "tokens"]


def test_a_digest_is_of_the_content_whatever_the_order_of_its_keys():
    """Settings read from YAML, overrides and code build the same mapping in other orders: its
    digest (the ablation fingerprint's "counts", a random-init model's) must not refuse
    equal settings."""
    assert F.digest({"a": 1, "b": {"x": [1, 2], "y": None}}) == F.digest({"b": {"y": None, "x": [1, 2]}, "a": 1})
    assert F.digest({"a": 1, "b": 2}) != F.digest({"a": 2, "b": 1})


def test_token_digests_tell_where_each_sequence_and_each_group_ends():
    """The tokens of a set of records are hashed with each sequence's shape and dtype and each
    group apart: a token moved from one record to the next, or an array moved from the ids to
    the scopes, is another set."""
    import numpy as np

    a, b, c = (np.array([1, 2], np.int32), np.array([3], np.int32), np.array([2, 3], np.int32))
    one = np.array([1], np.int32)
    assert F.digest_arrays([a, b]) != F.digest_arrays([one, c])  # the same stream, cut elsewhere
    assert F.digest_arrays([a, b]) != F.digest_arrays([a.astype(np.int64), b.astype(np.int64)])
    assert F.digest_arrays([a], [b]) != F.digest_arrays([a, b], []) != F.digest_arrays([a, b])
    assert F.digest_arrays([a, b]) == F.digest_arrays([a.copy(), b.copy()])


def test_a_component_present_on_one_side_only_differs():
    """A setting recorded with the stored outputs but absent now (a gate dtype dropped from the
    config), or absent then and present now, or recorded as None and now absent, differs."""
    stored = {"model": "m", "gate_dtype": "float32", "max_length": None}
    assert F.difference(stored, {"model": "m", "max_length": None}) == ["gate_dtype"]
    assert F.difference({"model": "m"}, {"model": "m", "gate_dtype": "float32"}) == ["gate_dtype"]
    assert F.difference(stored, {"model": "m", "gate_dtype": "float32"}) == ["max_length"]
    assert F.stale_keys(stored, {"model": "m", "gate_dtype": "float32", "max_length": None}) == []


# --------------------------------------------------------------------------- #
# The environment every output records
# --------------------------------------------------------------------------- #

def test_environment_names_the_versions_backend_and_devices_this_process_runs():
    import platform
    from importlib import metadata

    import jax

    env = F.environment()
    assert env["python"] == platform.python_version() and env["platform"] == platform.platform()
    assert env["packages"] == {name: metadata.version(name) for name in F.ENVIRONMENT_PACKAGES}
    assert env["packages"]["jax"] == jax.__version__ and "torch" not in env["packages"]
    assert (env["backend"], env["device_count"], env["process_count"]) == (
        jax.default_backend(), jax.device_count(), jax.process_count())
    assert env["device_kind"] == jax.devices()[0].device_kind
    assert env["sparcom_jax"]["version"] == metadata.version("sparcom_jax")
    assert env["sparcom_jax"].items() >= F.checkout().items()
    json.dumps(env)  # recorded as JSON


def git(root, *args):
    import subprocess

    return subprocess.run(["git", "-C", str(root), *args], check=True, capture_output=True, text=True).stdout.strip()


def test_checkout_gives_the_commit_and_whether_tracked_files_were_modified(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q")
    (repo / "a.py").write_text("x = 1\n")
    git(repo, "add", "a.py")
    git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "one")
    head = git(repo, "rev-parse", "HEAD")
    assert F.checkout(repo) == {"commit": head, "dirty": False}
    (repo / "untracked.txt").write_text("outputs beside the code do not make it dirty\n")
    F.checkout.cache_clear()
    assert F.checkout(repo) == {"commit": head, "dirty": False}
    (repo / "a.py").write_text("x = 2\n")
    F.checkout.cache_clear()
    assert F.checkout(repo) == {"commit": head, "dirty": True}
    assert F.checkout(tmp_path) == {}  # not a checkout (an installed package): no commit


def test_environment_changes_name_the_result_affecting_packages_and_the_backend_only():
    env = F.environment()

    def other(**kw):
        packages = {**env["packages"], **{k: v for k, v in kw.items() if k in env["packages"]}}
        return {**env, **{k: v for k, v in kw.items() if k not in env["packages"]}, "packages": packages}

    assert F.environment_changes(env, env) == []
    # a patch release of a package that does not compute, another platform or device count: no change
    assert F.environment_changes(other(datasets="0.0.1", tensorstore="0.0.1", platform="x", device_count=99), env) == []
    assert F.environment_changes(other(jax="0.4.0", numpy="1.26.0"), env) == [
        {"package": "jax", "old": "0.4.0", "new": env["packages"]["jax"]},
        {"package": "numpy", "old": "1.26.0", "new": env["packages"]["numpy"]}]
    assert F.environment_changes(other(backend="gpu", device_kind="NVIDIA H200"), env) == [
        {"package": "backend", "old": "gpu", "new": env["backend"]},
        {"package": "device_kind", "old": "NVIDIA H200", "new": env["device_kind"]}]
    assert F.environment_changes(None, env) == F.environment_changes({}, env) == [F.UNRECORDED]


def test_with_environment_keeps_every_environment_and_the_part_each_made():
    a, b = {"packages": {"jax": "0.10.1"}}, {"packages": {"jax": "0.10.2"}}
    assert F.with_environment({"environment": a}, a, 4, "chunk") is None  # the same: nothing to record
    two = F.with_environment({"environment": a, "x": 1}, b, 4, "chunk")
    assert two == {"x": 1, "environment": a, "environments": [{"environment": a, "from": 0, "unit": "chunk"},
                                                              {"environment": b, "from": 4, "unit": "chunk"}]}
    # a resume that made nothing before the next one: its part is replaced, and the same again merges
    assert F.with_environment(two, a, 4, "chunk") == {"x": 1, "environment": a}
    assert F.environment_parts(F.with_environment(two, {"packages": {}}, 4, "chunk"))[1]["environment"] == {"packages": {}}
    # work before environments were recorded: its part stays, not recorded, and no first environment is claimed
    old = F.with_environment({}, b, 3, "step")
    assert "environment" not in old and [p["environment"] for p in old["environments"]] == [None, b]
    assert F.part_ranges(old["environments"], 5, first=1) == ["steps 1-3", "steps 4-5"]
    assert F.parts_line("train", old["environments"], ["steps 1-3", "steps 4-5"]) == (
        "train made under versions not recorded (steps 1-3) and jax 0.10.2, backend None (steps 4-5)")
    assert F.with_environment({}, b, 0, "step") == {"environment": b}  # all made now
    assert F.part_ranges([{"from": 0, "unit": "chunk"}, {"from": 2, "unit": "chunk"}], None) == ["chunks 0-1",
                                                                                                 "chunks 2 on"]


def test_fingerprint_files_record_the_environment_beside_the_components(tmp_path):
    F.write_fingerprint(tmp_path / "a", "identify", {"x": 1})
    whole = F.read_fingerprint(tmp_path / "a", whole=True)
    assert whole["environment"] == F.environment() and F.read_fingerprint(tmp_path / "a") == {"x": 1}
    made = {"python": "3.0", "packages": {"jax": "0.1"}}
    F.write_fingerprint(tmp_path / "b", "identify", {"x": 1}, made_under=made)
    assert F.read_fingerprint(tmp_path / "b", whole=True)["environment"] == made
    F.write_fingerprint(tmp_path / "c", "identify", {"x": 1}, made_under={})  # made before it was recorded
    assert "environment" not in F.read_fingerprint(tmp_path / "c", whole=True)
    # the digest is of the components alone: the versions never make work stale
    assert F.read_fingerprint(tmp_path / "a", whole=True)["digest"] == F.read_fingerprint(tmp_path / "b", whole=True)["digest"]
