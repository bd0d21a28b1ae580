"""sparcom_jax.parallel.processes on simulated processes: the decisions and exchanges of a
multi-host run, played out in one process by answering `gather` (the allgather) and the
coordination service as P processes would. The real two-process runs are in test_collect.py."""

from __future__ import annotations

import itertools

import jax
import numpy as np
import pytest

from sparcom_jax.errors import ConfigError, OtherProcessError
from sparcom_jax.parallel import processes


def as_process(monkeypatch, k: int, p: int) -> None:
    monkeypatch.setattr(jax, "process_count", lambda: p)
    monkeypatch.setattr(jax, "process_index", lambda: k)


def item(i: int) -> np.ndarray:
    """float [3]: values whose bits a float round trip or a 32-bit carry would change."""
    return np.array([i + 0.1, -1e-300 * (i + 1), np.nan if i % 2 else -0.0])


def bits(a: np.ndarray) -> np.ndarray:
    return np.asarray(a, np.float64).view(np.int64)


@pytest.mark.parametrize("p, n", [(1, 5), (2, 7), (3, 7), (3, 2), (4, 8)])
def test_share_map_gives_every_process_every_item_in_order(p, n, monkeypatch):
    """Process k runs items k, k+P, ... only, and every process ends with item i in row i, bit
    for bit (NaN, -0.0, subnormal-small values), also when P does not divide n or n < P."""
    ran, sent = {}, {}

    def run_as(k, others):
        as_process(monkeypatch, k, p)

        def gather(values):
            a = np.asarray(values, np.int64)
            if a.ndim < 2:  # raise_together's error flags: nobody failed
                return np.stack([a] * p)
            sent[k] = a
            return np.stack([a if j == k else others.get(j, np.zeros_like(a)) for j in range(p)])

        monkeypatch.setattr(processes, "gather", gather)

        def fn(i):
            ran.setdefault(k, []).append(i)
            return item(i)

        return processes.share_map(fn, n, 3, "sharing")

    for k in range(p):  # each process's own rows, as the allgather would receive them
        run_as(k, {})
    local = dict(sent)
    ran.clear()
    want = bits(np.stack([item(i) for i in range(n)]))
    for k in range(p):
        got = run_as(k, local)
        assert got.shape == (n, 3) and got.dtype == np.float64
        np.testing.assert_array_equal(bits(got), want)
        assert ran.get(k, []) == list(range(k, n, p))


def test_share_map_raises_an_item_s_error_on_every_process(monkeypatch):
    def fn(i):
        if i == 1:
            raise KeyError("item 1")
        return item(i)

    with pytest.raises(KeyError, match="item 1"):  # one process: the error itself
        processes.share_map(fn, 3, 3, "sharing")
    # process 0 of 2 (items 0 and 2) succeeded; process 1 failed on item 1
    as_process(monkeypatch, 0, 2)
    monkeypatch.setattr(processes, "gather", lambda v: np.array([int(np.asarray(v)), 1]))
    monkeypatch.setattr(processes, "_coordination", lambda: None)
    with pytest.raises(OtherProcessError, match=r"^sharing: process 1 of 2 stopped with an error \(its log says "
                                                r"why\); every process stops with it$"):
        processes.share_map(fn, 3, 3, "sharing")


class Coordination:
    """jax.distributed's key-value client, as far as raise_together uses it."""

    def __init__(self):
        self.values: dict[str, str] = {}

    def key_value_set(self, key, value):
        assert key not in self.values, key  # the real service refuses to overwrite a key
        self.values[key] = value

    def blocking_key_value_get(self, key, timeout_ms):
        return self.values[key]


def test_the_failed_process_s_message_reaches_the_others(monkeypatch):
    """Process 1 of 3 fails: it leaves its error (one line, at most 500 characters and an ellipsis)
    with the coordination service, waits at one more gather until the others have read it, and
    raises its own error; processes 0 and 2 raise OtherProcessError quoting it."""
    client = Coordination()
    monkeypatch.setattr(processes, "_coordination", lambda: client)
    error = ValueError("disk full\n  while writing\n\n" + "x" * 600)
    calls = {}

    def play(k):
        as_process(monkeypatch, k, 3)
        monkeypatch.setattr(processes, "_rounds", itertools.count(7))  # every process's 8th call
        calls[k] = []

        def gather(v):
            calls[k].append(int(np.asarray(v)))
            return np.array([0, 1, 0])  # process 1 failed

        monkeypatch.setattr(processes, "gather", gather)
        processes.raise_together(error if k == 1 else None, "counting")

    with pytest.raises(ValueError) as raised:
        play(1)
    assert raised.value is error
    line = "ValueError: disk full | while writing | " + "x" * 600
    assert client.values == {"sparcom/raise_together/7/1": line[:500] + "..."}
    for k in (0, 2):
        with pytest.raises(OtherProcessError) as other:
            play(k)
        assert str(other.value) == ("counting: process 1 of 3 stopped with an error (its log says why): "
                                    + line[:500] + "...; every process stops with it")
    # every process met at the flags' gather and once more, so process 1 left after the others read
    assert calls == {0: [0, 0], 1: [1, 0], 2: [0, 0]}


def test_a_short_message_is_posted_whole_and_no_error_posts_nothing(monkeypatch):
    client = Coordination()
    monkeypatch.setattr(processes, "_coordination", lambda: client)
    as_process(monkeypatch, 1, 2)  # two processes: the failed one posts too
    monkeypatch.setattr(processes, "_rounds", itertools.count(0))
    calls = []

    def gather(v):
        calls.append(int(np.asarray(v)))
        return np.array([0, calls[-1]])

    monkeypatch.setattr(processes, "gather", gather)
    processes.raise_together(None, "fine")  # nobody failed: nothing posted, nothing raised
    assert client.values == {} and calls == [0]
    with pytest.raises(RuntimeError):
        processes.raise_together(RuntimeError("x" * 500), "failing")
    assert calls == [0, 1, 0]  # it waited once more for the other process to read its message
    assert client.values == {"sparcom/raise_together/1/1": "RuntimeError: " + "x" * 486 + "..."}
    with pytest.raises(RuntimeError):
        processes.raise_together(RuntimeError("y" * 486), "failing")  # 500 characters: whole
    assert client.values["sparcom/raise_together/2/1"] == "RuntimeError: " + "y" * 486
    with pytest.raises(RuntimeError):
        processes.raise_together(RuntimeError("z" * 487), "failing")  # 501 characters: cut
    assert client.values["sparcom/raise_together/3/1"] == "RuntimeError: " + "z" * 486 + "..."


def test_one_process_raises_its_own_error_and_posts_nothing(monkeypatch):
    client = Coordination()
    monkeypatch.setattr(processes, "_coordination", lambda: client)
    processes.raise_together(None, "fine")
    with pytest.raises(OSError, match="^full$"):
        processes.raise_together(OSError("full"), "writing")
    assert client.values == {}
    with pytest.raises(OSError, match="^full$"):
        with processes.together("writing"):
            raise OSError("full")
    with processes.together("writing"):
        pass


def test_check_same_names_the_processes_that_differ(monkeypatch):
    processes.check_same({"a": 1}, "the config", "fix it")  # one process: itself
    ids = {"mine": processes.key_id("mine"), "other": processes.key_id("other")}
    monkeypatch.setattr(processes, "gather", lambda v: np.array([[ids["mine"]], [v], [v]]))
    processes.check_same("mine", "the config", "fix it")  # three processes agree: no error
    monkeypatch.setattr(processes, "gather", lambda v: np.array([[ids["mine"]], [v], [ids["other"]], [v]]))
    with pytest.raises(ConfigError, match=r"^the config of process\(es\) 2 of 4 differ from process 0's; fix it$"):
        processes.check_same("mine", "the config", "fix it")
    monkeypatch.setattr(processes, "gather", lambda v: np.array([[ids["other"]], [v], [ids["other"]], [v]]))
    with pytest.raises(ConfigError, match=r"^the config of process\(es\) 1, 3 of 4 differ"):
        processes.check_same("mine", "the config", "fix it")


def test_key_ids_are_28_bit_and_equal_exactly_for_equal_keys():
    """Ids cross processes as 32-bit integers (the allgather's), so they must stay below 2**31;
    28 bits keep a collision of two different keys at about 1 in 2**28."""
    keys = [{"n": i, "s": str(i)} for i in range(400)]
    ids = [processes.key_id(k) for k in keys]
    assert max(ids) < 2 ** 28 and max(ids) >= 2 ** 27  # all 28 bits in use (400 draws)
    assert len(set(ids)) == len(ids)
    assert processes.key_id({"s": "3", "n": 3}) == ids[3]  # key order does not matter
    np.testing.assert_array_equal(processes.gather_keys({"n": 5, "s": "5"}), [ids[5]])


def test_gather_stacks_every_process_s_values(monkeypatch):
    np.testing.assert_array_equal(processes.gather(7), [7])  # one process: [1, *shape]
    got = processes.gather([[1, 2]])
    assert got.shape == (1, 1, 2) and got.dtype == np.int64
    from jax.experimental import multihost_utils

    monkeypatch.setattr(multihost_utils, "process_allgather", lambda a: np.stack([a + k for k in range(jax.process_count())]))
    for p in (2, 3):
        as_process(monkeypatch, 0, p)
        np.testing.assert_array_equal(processes.gather([4, 5]), [[4 + k, 5 + k] for k in range(p)])


def test_a_coordination_service_that_fails_costs_only_the_quote(monkeypatch):
    """Posting or fetching the message is a courtesy: when the service refuses, the failed
    process still raises its own error and the others theirs, without the quote."""

    class Broken:
        def key_value_set(self, key, value):
            raise RuntimeError("service gone")

        def blocking_key_value_get(self, key, timeout_ms):
            raise TimeoutError("nothing there")

    monkeypatch.setattr(processes, "_coordination", lambda: Broken())
    monkeypatch.setattr(processes, "gather", lambda v: np.array([int(np.asarray(v)), 1]))
    as_process(monkeypatch, 1, 2)
    with pytest.raises(KeyError, match="mine"):
        processes.raise_together(KeyError("mine"), "counting")
    as_process(monkeypatch, 0, 2)
    with pytest.raises(OtherProcessError, match=r"^counting: process 1 of 2 stopped with an error \(its log says "
                                                r"why\); every process stops with it$"):
        processes.raise_together(None, "counting")


def test_the_coordination_client_is_jax_distributed_s(monkeypatch):
    from jax._src import distributed

    client = Coordination()
    monkeypatch.setattr(distributed.global_state, "client", client)
    assert processes._coordination() is client


def test_check_same_names_the_settings_that_differ(monkeypatch):
    """Eight hosts each read their own config: "the config of process 3 differs" left the user diffing
    files by hand. With `parts` the refusal names the settings that differ (the processes compare one
    id per setting, in a gather of a fixed size, so processes of another version still meet)."""
    mine = {"stage": "collect", "identify.eps": 0.01, "data.seed": 0, "mesh.model": 4}
    theirs = {**mine, "identify.eps": 0.02, "mesh.model": 2}
    processes.check_same(mine, "the config", "fix it", parts=mine)  # one process: itself

    def play(k, keys, first=mine):
        """Process 0 of 2 holding `first`, process 1 holding `keys`; the refusal `k` raises."""
        as_process(monkeypatch, k, 2)
        held = [first, keys]

        def gather(v):
            a = np.asarray(v)
            if a.ndim == 0:
                return np.array([[processes.key_id(h)] for h in held])
            return np.stack([processes.part_ids(h) for h in held])

        monkeypatch.setattr(processes, "gather", gather)
        with pytest.raises(ConfigError) as e:
            processes.check_same(held[k], "the config", "fix it", parts=held[k])
        return str(e.value)

    for k in (0, 1):  # both processes name the same settings
        assert play(k, theirs) == ("the config of process(es) 1 of 2 differ from process 0's (identify.eps, "
                                   "mesh.model); fix it")
    many = {**mine, **{f"train.x{i}": i for i in range(300)}}  # more settings than ids: still named
    named = play(0, {**many, "train.x299": -1}, many).split("(")[2].split(")")[0].split(", ")
    assert "train.x299" in named and len(named) <= 2  # at most one more, sharing its slot
    assert "(it has other settings: another version of sparcom_jax?)" in play(0, {**mine, "new.key": 1})
