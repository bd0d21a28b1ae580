"""Disjoint splits of one record set: fine-tuning, identification and the causal check's evaluation.

A finding about what fine-tuning changes must not rest on the records the model was
tuned on, and a causal check must not be scored on the records its units were chosen
from. `split_records` cuts one set into disjoint parts:

- stratified by category, so every part keeps the categories balanced;
- grouped by instruction (`group_keys`), so templated near-duplicates never straddle
  two parts: "near" (the default of runs, `data.group_by`) makes records of one
  category whose instructions share most of their words one group, joined through
  chains of such pairs; "text" (these functions' default) joins only identical
  instruction text (case and spacing ignored);
- one instruction text under several categories in one part across them (`split_records`),
  so no text is identified on for one category and held out or tuned on for another;
- deterministic for a seed and a record set. It is not stable per record: groups are
  dealt out against category totals, so adding or removing records can move others to
  another part (the pipeline refuses checkpoints tuned on another train part).

    parts = split_records(records, {"train": 0.5, "identify": 0.3, "ablate": 0.2}, seed=0)
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from typing import Literal, Mapping, Sequence

import numpy as np

from sparcom_jax.categories import CATEGORIES
from sparcom_jax.data.records import Record, find_duplicates, normalise_text
from sparcom_jax.fingerprint import digest

GroupBy = Literal["text", "near"]
# The grouping of runs (data.group_by, collect_instructions): identical text alone leaves
# templated variants ("Find the mean ..." / "Find the median ...") as independent records.
DEFAULT_GROUP_BY: GroupBy = "near"
# Measured on the shipped set (docs/data.md): at 0.6 the joins are templated variants ("What is
# the capital city of Canada?" / "... of Japan?"); at 0.5 chains start to join unrelated
# instructions into one group of 24.
NEAR_THRESHOLD = 0.6
_NUMBER = re.compile(r"\b\d+(?:[.,]\d+)*\b")
_WORD = re.compile(r"\w+")


def group_key(record: Record) -> str:
    """The instruction text that identical-text groups share: lower-cased, whitespace collapsed."""
    return normalise_text(record.instruction)


def near_words(record: Record) -> frozenset[str]:
    """The word set that near-duplicate grouping compares: the words of `group_key`, every
    number written as 0 (templates often vary a number: "Calculate 12% of 450.")."""
    return _key_words(group_key(record))


def _key_words(key: str) -> frozenset[str]:
    """`near_words` of a record from its `group_key` (the searches have the keys already)."""
    return frozenset(_WORD.findall(_NUMBER.sub("0", key)))


def _check_threshold(threshold: float) -> None:
    if not 0 < threshold <= 1:
        raise ValueError(f"group_threshold={threshold}: a Jaccard in (0, 1]")


# The rule's slack on the intersection: 0.7 * 10 is 7.000000000000001 in floating point.
_SLACK = 1e-9
# The filters' bounds are loosened by more than _SLACK, so that rounding never drops a pair the
# rule joins (a looser bound only lets more candidates through to the exact check).
_BOUND_SLACK = 1e-6
# Candidate pairs of word sets generated and checked at a time by `_set_pairs` (memory).
_CHUNK = 1 << 20
# Candidate pairs `_set_forest` checks before joining what they found: the pairs of later batches
# whose sets are connected by then are skipped.
_BATCH = 1 << 14


def _joins(inter: np.ndarray, union: np.ndarray, threshold: float) -> np.ndarray:
    """The near rule on float64 counts: a union, and an intersection of at least threshold * union."""
    return (union > 0) & (inter >= threshold * union - _SLACK)


def _least_overlap(size: np.ndarray, factor: float) -> np.ndarray:
    """A lower bound on the words shared by a joined pair, from one side's size: ceil(factor * size),
    loosened by _BOUND_SLACK, at least 0."""
    return np.maximum(np.ceil(factor * size - _BOUND_SLACK), 0).astype(np.int64)


def _distinct(a: np.ndarray) -> np.ndarray:
    """The distinct values of a 1-D int array, ascending (sorting: numpy 2.4's np.unique hashes,
    about 50 times slower on millions of pair codes)."""
    a = np.sort(a)
    return a[np.concatenate([[True], a[1:] != a[:-1]])] if a.size else a


def _overlaps(keys: np.ndarray, v: int, ptr: np.ndarray, tok: np.ndarray, y: np.ndarray,
              x: np.ndarray) -> np.ndarray:
    """|set y & set x| of each pair, int64 [P]: every word of y looked up among x's.

    The sets are rows of a CSR (`ptr` [S + 1], `tok`: each row's word ids, ascending); rows
    are laid end to end, so `keys` = set * `v` + word (`v` > every word id) is ascending over
    `tok` and one binary search finds a word in a set.
    """
    ny = ptr[y + 1] - ptr[y]
    pair = np.repeat(np.arange(y.size), ny)
    at = np.arange(pair.size) - np.repeat(np.cumsum(ny) - ny, ny) + np.repeat(ptr[y], ny)
    query = x[pair] * v + tok[at]
    hit = keys[np.minimum(np.searchsorted(keys, query), keys.size - 1)] == query
    return np.bincount(pair, hit, minlength=y.size).astype(np.int64)


class _PrefixIndex:
    """The prefix-filter index of a family of word sets, shared by `_set_pairs` and `_set_forest`.

    Words are numbered rarest first and the sets ordered by size; set ids below are ranks in that
    order (`order` maps a rank back to the set). A joined pair x, y (|y| <= |x|) shares at least
    o >= t |x| and o >= 2t/(1+t) |y| words, so the first |x| - o + 1 words of x (its probe prefix)
    and the first |y| - o + 1 words of y (its index prefix) share one.

    Attributes:
      n: S, the sets. order: int64 [S], the set of each rank. size: int64 [S], each rank's word count.
      ptr: int64 [S + 1], tok: int64 [W], keys, width: the sets' word numbers as a CSR, ascending
        within a set (what `_overlaps` looks words up in).
      probe_o: int64 [S], the least overlap a rank shares with a set it joins, from its own size.
      p_set, p_tok: int64 [Q], the probe prefixes' words, by rank.
      i_set, i_tok: int64 [I], the index prefixes' words, sorted by (word, rank).
      lo, count: int64 [Q], per probe word, the index entries i_set[lo:lo + count]: the earlier
        ranks (< p_set) of size >= probe_o[p_set] holding the word in their index prefix.
    """

    def __init__(self, sets: list[frozenset[str]], threshold: float):
        size = np.asarray([len(s) for s in sets], np.int64)
        self.order = order = np.argsort(size, kind="stable")
        self.size = size = size[order]
        self.ptr = np.concatenate([[0], np.cumsum(size)])
        self.n = n = size.size
        owner = np.repeat(np.arange(n, dtype=np.int64), size)
        seen: dict[str, int] = {}  # each word's first appearance (one dict look-up per word, in C)
        tok = np.asarray([seen.setdefault(w, len(seen)) for i in order.tolist() for w in sets[i]], np.int64)
        # Renumbered rarest first, ties in word order (sorting the distinct words only).
        words = list(seen)
        alpha = np.empty(len(words), np.int64)
        alpha[sorted(range(len(words)), key=words.__getitem__)] = np.arange(len(words))
        number = np.empty(len(words), np.int64)
        number[np.lexsort((alpha, np.bincount(tok, minlength=len(words))))] = np.arange(len(words))
        tok = number[tok]
        self.tok = tok = tok[np.lexsort((tok, owner))]
        self.width = int(tok.max()) + 1 if tok.size else 1
        self.keys = owner * self.width + tok  # (built once: `_overlaps` looks words up in it for every chunk)
        pos = np.arange(tok.size) - self.ptr[owner]
        self.probe_o = probe_o = _least_overlap(size, threshold)
        probe = pos < (size - np.maximum(probe_o, 1) + 1)[owner]
        index = pos < (size - np.maximum(_least_overlap(size, 2 * threshold / (1 + threshold)), 1) + 1)[owner]
        # Index prefixes by (word, set); with sets in size order, sizes ascend within a word too.
        i_set, i_tok = owner[index], tok[index]
        by = np.lexsort((i_set, i_tok))
        self.i_set, self.i_tok = i_set, i_tok = i_set[by], i_tok[by]
        big = int(size[-1]) + 1 if n else 1
        key_set, key_size = i_tok * n + i_set, i_tok * big + size[i_set]
        self.p_set, self.p_tok = p_set, p_tok = owner[probe], tok[probe]
        self.lo = np.searchsorted(key_size, p_tok * big + probe_o[p_set])
        self.count = np.maximum(np.searchsorted(key_set, p_tok * n + p_set) - self.lo, 0)
        self.threshold = threshold

    def joined(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Which pairs of ranks (x, y) the near rule joins, bool [P]: their overlaps counted exactly."""
        inter = _overlaps(self.keys, self.width, self.ptr, self.tok, y, x).astype(np.float64)
        return _joins(inter, (self.size[x] + self.size[y]).astype(np.float64) - inter, self.threshold)

    def loose(self) -> tuple[np.ndarray, np.ndarray]:
        """Every pair (x, y), y < x, of the ranks that may join a set sharing no word with them (t |x|
        within the slack of 0: a set without words, or a tiny threshold): checked all against all."""
        loose = np.flatnonzero(self.probe_o == 0)
        ly, lx = np.triu_indices(loose.size, 1)
        return loose[lx], loose[ly]

    def expand(self, seg_x: np.ndarray, seg_start: np.ndarray, seg_len: np.ndarray, src: np.ndarray):
        """The candidate pairs (x, y) of segments: x = seg_x[k] with every y of src[seg_start[k]:][:seg_len[k]]."""
        x = np.repeat(seg_x, seg_len)
        at = np.repeat(seg_start, seg_len) + np.arange(x.size) - np.repeat(np.cumsum(seg_len) - seg_len, seg_len)
        return x, src[at]

    def chunks(self, per_probe: np.ndarray, chunk: int):
        """Slices [a, b) of the probe words (which are in rank order) holding about `chunk` candidates
        each (`per_probe` per probe word), of whole sets, so that a pair found through two words is
        in one chunk."""
        n = self.n
        per_set = np.concatenate([[0], np.cumsum(np.bincount(self.p_set, per_probe, minlength=n).astype(np.int64))])
        start = 0
        while start < n:
            stop = max(int(np.searchsorted(per_set, per_set[start] + chunk, "right")) - 1, start + 1)
            yield tuple(np.searchsorted(self.p_set, [start, stop]))
            start = stop


def _joined_chunks(sets: list[frozenset[str]], threshold: float, chunk: int):
    """The pairs of distinct word sets that the near rule joins, a chunk at a time: yields int64
    arrays u, v (set numbers), each joined pair once over all chunks.

    An exact similarity join (prefix filtering, as in AllPairs / PPJoin, `_PrefixIndex`): each set
    is looked up by its probe prefix among the earlier sets' index prefixes of size >= t |x|, and
    only those candidates are counted exactly. Pairs that share no word are checked among the sets
    that could have one, all against all, first.
    """
    if len(sets) < 2:
        return
    ix = _PrefixIndex(sets, threshold)
    n, order = ix.n, ix.order
    loose = ix.probe_o == 0

    def joined(x, y):
        keep = ix.joined(x, y)
        return order[x[keep]], order[y[keep]]

    yield joined(*ix.loose())
    for a, b in ix.chunks(ix.count, chunk):
        x, y = ix.expand(ix.p_set[a:b], ix.lo[a:b], ix.count[a:b], ix.i_set)
        cand = _distinct((x * n + y)[~(loose[x] & loose[y])])  # loose pairs were checked above
        yield joined(cand // n, cand % n)


def _set_pairs(sets: list[frozenset[str]], threshold: float, chunk: int) -> np.ndarray:
    """Every pair of distinct word sets that the near rule joins (`_joined_chunks`): int64 [P, 2]
    (u, v), u < v, sorted."""
    n = len(sets)
    codes = [np.minimum(u, v) * n + np.maximum(u, v) for u, v in _joined_chunks(sets, threshold, chunk)]
    codes = np.sort(np.concatenate(codes)) if codes else np.zeros(0, np.int64)
    return np.stack([codes // max(n, 1), codes % max(n, 1)], 1)


def _roots(label: np.ndarray, x: np.ndarray) -> np.ndarray:
    """The component of each element of x: its root in `label` (parent pointers, each to a smaller
    element or itself, so that following them ends)."""
    r = label[x]
    while True:
        up = label[r]
        if np.array_equal(up, r):
            return r
        r = up


def _merge(label: np.ndarray, a: np.ndarray, b: np.ndarray) -> None:
    """Join the components of a[k] and b[k] for every k, in place: the larger root points at the
    smaller, so a component's root is its smallest element."""
    while a.size:
        ra, rb = _roots(label, a), _roots(label, b)
        apart = ra != rb
        a, b, ra, rb = a[apart], b[apart], ra[apart], rb[apart]
        np.minimum.at(label, np.maximum(ra, rb), np.minimum(ra, rb))


def _likely_joined(ix: _PrefixIndex) -> tuple[np.ndarray, np.ndarray]:
    """Pairs of ranks (first, other) that templates make likely to join, to be checked before the
    prefix-filter candidates: sets that are equal after leaving out one of their words (one free
    word slot: "What is the capital of X?") or their 2 or 3 rarest words (free slots filled with
    phrases: the fillers are a template's rarest words), where what is left keeps at least t of
    the set's words.

    Found by hashing what is left (a random 64-bit code per word, summed): sets with one such key
    are proposed against the key's first set, so k fillers of one slot give about k proposals
    instead of k (k - 1) / 2 candidates. A proposal is only a candidate: `_PrefixIndex.joined`
    decides (a hash collision only proposes a pair that it rejects).
    """
    size, ptr, tok = ix.size, ix.ptr, ix.tok
    code = np.random.default_rng(0).integers(0, 2**63, ix.width, dtype=np.int64).astype(np.uint64)
    run = np.concatenate([np.zeros(1, np.uint64), np.cumsum(code[tok], dtype=np.uint64)])  # wraps, as a hash may
    whole = run[ptr[1:]] - run[ptr[:-1]]
    owner = np.repeat(np.arange(ix.n, dtype=np.int64), size)
    keys, members = [whole[owner] - code[tok]], [owner]  # each set less one of its words
    for r in (2, 3):  # each set less its r rarest words
        keys.append(whole - (run[np.minimum(ptr[:-1] + r, ptr[1:])] - run[ptr[:-1]]))
        members.append(np.arange(ix.n, dtype=np.int64))
    left = np.concatenate([size[owner] - 1, size - 2, size - 3])
    member = np.concatenate(members)
    keep = (left >= 1) & (left >= ix.threshold * size[member] - _BOUND_SLACK)
    key, member = np.concatenate(keys)[keep], member[keep]
    by = np.lexsort((member, key))
    key, member = key[by], member[by]
    head = np.concatenate([[True], key[1:] != key[:-1]]) if key.size else np.zeros(0, bool)
    first = member[np.flatnonzero(head)[np.cumsum(head) - 1]]
    other = ~head & (first != member)
    return member[other], first[other]


def _set_forest(sets: list[frozenset[str]], threshold: float, chunk: int) -> tuple[tuple[np.ndarray, np.ndarray], int]:
    """Pairs of distinct word sets that the near rule joins, enough to connect every component of
    the joined pairs (`_set_pairs`): what grouping needs.

    The candidates of `_set_pairs` whose sets are already connected are skipped, not checked:
    first the pairs templates make likely (`_likely_joined`) are checked and joined; then each probe
    word takes its candidates either as `_set_pairs` does or, when fewer, from an index sorted by
    those components, skipping the block of its own component in one step; and in batches of
    `_BATCH` candidates (joins found early skip later ones) the candidates between two components
    are checked a few at a time (1, 2, 4, ...), stopping once one joins. A pair is skipped only when its sets are connected already, so the components are
    those of every joined pair. A template with a free word slot filled by k different words
    (k (k - 1) / 2 joined pairs) costs about k checks.

    Returns:
      (u, v): int64 [P] each, set numbers of joined pairs, u < v; P <= the candidates checked.
      checked: the candidate pairs counted exactly.
    """
    none = np.zeros(0, np.int64)
    if len(sets) < 2:
        return (none, none), 0
    ix = _PrefixIndex(sets, threshold)
    n = ix.n
    label = np.arange(n, dtype=np.int64)
    edges, checked = [np.zeros((0, 2), np.int64)], 0

    def check(x, y):  # candidates (x, y), any order or repeats: join components a few pairs at a time
        nonlocal checked
        # A pair found by several probe words or passes within one call, checked once (repeats
        # across calls, in other batches, are not deduped).
        x, y = np.unique(np.stack([x, y], 1), axis=0).T
        quota = 1
        while x.size:
            lx, ly = _roots(label, x), _roots(label, y)
            keep = lx != ly
            x, y, lx, ly = x[keep], y[keep], lx[keep], ly[keep]
            group = np.minimum(lx, ly) * n + np.maximum(lx, ly)
            by = np.lexsort((y, x, group))  # deterministic: the same records give the same links
            x, y, group = x[by], y[by], group[by]
            head = np.concatenate([[True], group[1:] != group[:-1]]) if group.size else np.zeros(0, bool)
            now = np.arange(group.size) - np.flatnonzero(head)[np.cumsum(head) - 1] < quota
            ok = ix.joined(x[now], y[now])
            checked += int(now.sum())
            edges.append(np.stack([x[now][ok], y[now][ok]], 1))
            _merge(label, x[now][ok], y[now][ok])
            x, y, quota = x[~now], y[~now], quota * 2

    def check_in_batches(x, y):  # joins found early in a chunk spare the checks of later candidates
        for at in range(0, x.size, _BATCH):
            check(x[at:at + _BATCH], y[at:at + _BATCH])
        label[:] = _roots(label, np.arange(n))  # every pointer to its root: short walks from here on

    check_in_batches(*_likely_joined(ix))
    check_in_batches(*ix.loose())
    # The index prefixes again, sorted by (word, component, rank): a probe word's entries outside its
    # own component are two ranges, cheaper than its rank range when that component fills the word.
    by = np.lexsort((ix.i_set, label[ix.i_set], ix.i_tok))
    c_set = ix.i_set[by]
    c_key = ix.i_tok[by] * n + label[c_set]
    word_at, own_at = ix.p_tok * n, ix.p_tok * n + label[ix.p_set]
    w_lo, w_hi = np.searchsorted(c_key, word_at), np.searchsorted(c_key, word_at + n)
    o_lo, o_hi = np.searchsorted(c_key, own_at), np.searchsorted(c_key, own_at, "right")
    by_comp = (w_hi - w_lo) - (o_hi - o_lo) < ix.count
    src = np.concatenate([ix.i_set, c_set])
    off = ix.i_set.size
    for a, b in ix.chunks(np.where(by_comp, (w_hi - w_lo) - (o_hi - o_lo), ix.count), chunk):
        p, bc = ix.p_set[a:b], by_comp[a:b]
        seg_x = np.concatenate([p[~bc], p[bc], p[bc]])
        seg_start = np.concatenate([ix.lo[a:b][~bc], off + w_lo[a:b][bc], off + o_hi[a:b][bc]])
        seg_len = np.concatenate([ix.count[a:b][~bc], (o_lo - w_lo)[a:b][bc], (w_hi - o_hi)[a:b][bc]])
        x, y = ix.expand(seg_x, seg_start, seg_len, src)
        keep = (y < x) & (ix.size[y] >= ix.probe_o[x])  # the rank range (already so for `_set_pairs`' own)
        check_in_batches(x[keep], y[keep])
    found = np.concatenate(edges)
    u, v = ix.order[found[:, 0]], ix.order[found[:, 1]]
    return (np.minimum(u, v), np.maximum(u, v)), checked


def _category_sets(records: Sequence[Record], keys: Sequence[str], threshold: float):
    """The records of each category by distinct word set: what `near_pairs` and `_near_links`
    search (`keys`: the records' `group_key`s), so that records sharing one word set are
    handled once as a set.

    Yields, per category with records:
      idx: int64 [n_c], the category's record indices, ascending.
      of: int64 [n_c], each of them's word set (`near_words`), numbered by first appearance.
      n_of: int64 [S], each set's number of records.
      first: int64 [S], each set's first record (index into `records`).
      self_join: bool [S], the sets whose records are all joined to each other (a set with
        words; a word-less set joins nothing).
      sets: the S distinct word sets.
    """
    for cat in CATEGORIES:
        idx = np.asarray([i for i, r in enumerate(records) if r.category == cat], np.int64)
        if not idx.size:
            continue
        ids: dict[frozenset[str], int] = {}
        of, first = [], []
        for i in idx.tolist():
            of.append(ids.setdefault(_key_words(keys[i]), len(ids)))
            if of[-1] == len(first):  # a new set
                first.append(i)
        of = np.asarray(of, np.int64)
        sets = list(ids)
        words = np.asarray([len(s) for s in sets], np.float64)
        yield (idx, of, np.bincount(of, minlength=len(sets)), np.asarray(first, np.int64),
               _joins(words, words, threshold), sets)


def near_pairs(records: Sequence[Record], threshold: float = NEAR_THRESHOLD,
               chunk: int = _CHUNK) -> list[tuple[int, int]]:
    """Every pair of records of one category whose word sets (`near_words`) overlap by a
    Jaccard of at least `threshold` (intersection >= threshold * union - 1e-9).

    For reading which records the rule joins; grouping does not call it (`group_keys` chains
    the distinct word sets instead): the list has every record pair, so a template with k
    variants of one word set alone gives k (k - 1) / 2 pairs (50 million for 10,000 variants).
    The search itself is exact without comparing all pairs: a prefix-filtered similarity join
    over the distinct word sets (`_set_pairs`), whose time grows with the candidates and the
    set pairs found, not with n_c^2 (docs/data.md has measurements).

    Args:
      records: the records.
      threshold: the smallest Jaccard that joins two records, in (0, 1].
      chunk: candidate pairs generated and checked at a time (memory).

    Returns:
      (i, j) index pairs, i < j, sorted. Two records without words are never a pair.

    Raises:
      ValueError: on a threshold outside (0, 1].
    """
    _check_threshold(threshold)
    n = max(len(records), 1)
    out = [np.zeros(0, np.int64)]
    for idx, of, n_of, _, self_join, sets in _category_sets(records, [group_key(r) for r in records], threshold):
        u, v = _set_pairs(sets, threshold, chunk).T
        # The records of each word set, laid end to end in set order (and record order within a set).
        mem = idx[np.argsort(of, kind="stable")]
        mem_ptr = np.concatenate([[0], np.cumsum(n_of)])
        for s in np.flatnonzero((n_of > 1) & self_join):
            first, second = np.triu_indices(int(n_of[s]), 1)
            m = mem[mem_ptr[s]:mem_ptr[s + 1]]
            out.append(m[first] * n + m[second])
        # Every record of u with every record of v.
        k = n_of[u] * n_of[v]
        at = np.arange(int(k.sum())) - np.repeat(np.cumsum(k) - k, k)
        a = mem[np.repeat(mem_ptr[u], k) + at // np.repeat(n_of[v], k)]
        b = mem[np.repeat(mem_ptr[v], k) + at % np.repeat(n_of[v], k)]
        out.append(np.minimum(a, b) * n + np.maximum(a, b))
    codes = np.sort(np.concatenate(out))
    return list(zip((codes // n).tolist(), (codes % n).tolist()))


def _near_links(records: Sequence[Record], keys: Sequence[str], threshold: float) -> tuple[np.ndarray, int]:
    """What grouping needs of `near_pairs`, without listing its pairs.

    Args:
      records: the records.
      keys: their `group_key`s (the caller has them).
      threshold: the near rule's Jaccard, in (0, 1].

    Returns:
      links: int64 [M, 2] record pairs whose chains join exactly the records that chains of
        `near_pairs` join: each record of a word set to the set's first record (the word-less
        set's records to the first of a set they join), and the first records of enough joined
        pairs of sets to connect them (`_set_forest`). M <= n + the candidate pairs checked,
        where `near_pairs` lists up to n^2 / 2.
      checked: the candidate pairs of word sets counted exactly (what the search cost).
    """
    links, checked = [np.zeros((0, 2), np.int64)], 0
    for idx, of, n_of, first, self_join, sets in _category_sets(records, keys, threshold):
        (u, v), done = _set_forest(sets, threshold, _CHUNK)
        checked += done
        # The record each record of a set is linked to: the set's first when the set joins itself;
        # for the word-less set, which does not, the first of a set it joins (each of its records
        # joins every record of that set, at a threshold within the slack of 0); else none.
        anchor = np.where(self_join, first, -1)
        alone_u, alone_v = ~self_join[u], ~self_join[v]
        anchor[u[alone_u]], anchor[v[alone_v]] = first[v[alone_u]], first[u[alone_v]]
        to = anchor[of]
        chained = (to >= 0) & (to != idx)
        links += [np.stack([to[chained], idx[chained]], 1), np.stack([first[u], first[v]], 1)]
    links = np.concatenate(links)
    links.flags.writeable = False  # cached and shared by every caller
    return links, checked


# The last few `_near_links` results, by the records' (category,
# `group_key`) and the threshold: a run groups one record set many times (its split, every
# model's counts, the report's data section), and the search takes seconds for hundreds of
# thousands of records (docs/data.md).
_PAIRS_CACHE: dict[tuple[str, float], object] = {}
_PAIRS_CACHE_SIZE = 8


def _near_links_once(records: Sequence[Record], keys: Sequence[str], threshold: float):
    """`_near_links(records, keys, threshold)`, computed once for the same records' texts and
    categories."""
    key = (digest([[r.category, k] for r, k in zip(records, keys)]), float(threshold))
    if key not in _PAIRS_CACHE:
        while len(_PAIRS_CACHE) >= _PAIRS_CACHE_SIZE:
            _PAIRS_CACHE.pop(next(iter(_PAIRS_CACHE)))
        _PAIRS_CACHE[key] = _near_links(records, keys, threshold)
    return _PAIRS_CACHE[key]


def group_keys(records: Sequence[Record], by: GroupBy = "text", threshold: float = NEAR_THRESHOLD) -> list[str]:
    """The group of each record: records of one category with one key are near-duplicates.

    Args:
      records: the records.
      by: "text" (the default of these functions, as before "near" existed): the
        `group_key` (identical instruction text); "near" (the default of runs,
        `DEFAULT_GROUP_BY`, `data.group_by`): records of one
        category with identical text or a `near_pairs` Jaccard >= threshold are joined,
        and so are chains of such pairs (union-find); a group's key is the `group_key` of
        its first record.
      threshold: the "near" rule's Jaccard.

    Returns:
      One key per record, in order.

    Raises:
      ValueError: on another `by`, or a threshold outside (0, 1].
    """
    keys = [group_key(r) for r in records]
    if by == "text":
        return keys
    if by != "near":
        raise ValueError(f"group_by={by!r}: use 'near' (near-duplicate instructions) or 'text' (identical text)")
    return _near_groups(records, keys, threshold)


def _near_groups(records: Sequence[Record], keys: Sequence[str], threshold: float) -> list[str]:
    """`group_keys(records, "near", threshold)` from the records' `group_key`s `keys`."""
    _check_threshold(threshold)
    links = _near_links_once(records, keys, threshold)[0]
    first: dict[tuple[str, str], int] = {}
    same_text = [(first.setdefault((r.category, k), i), i) for i, (r, k) in enumerate(zip(records, keys))]
    return [keys[r] for r in _joined(len(records), [*same_text, *links.tolist()])]


def _joined(n: int, pairs) -> list[int]:
    """Union-find over items 0..n-1 joined by `pairs` (and chains of them): each item's set, named
    by its earliest item."""
    parent = list(range(n))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in pairs:
        a, b = root(i), root(j)
        parent[max(a, b)] = min(a, b)  # the root stays the earliest item of its set
    return [root(i) for i in range(n)]


def group_ids(records: Sequence[Record], by: GroupBy = "text", threshold: float = NEAR_THRESHOLD) -> list[str]:
    """A short digest of each record's `group_keys`: what count stores keep per record, so
    that the analysis resamples near-duplicates together (records of one category with
    one id form one cluster, `sparcom_jax.analysis.uncertainty.cluster_index`)."""
    return [digest(k) for k in group_keys(records, by, threshold)]


def grouping_summary(records: Sequence[Record], by: GroupBy = "near",
                     threshold: float = NEAR_THRESHOLD) -> dict:
    """What a report says about the grouping of `records`: the rule, and the groups under
    identical text and under the near-duplicate rule at `threshold` (measured whichever
    rule is used, so a run grouped by text shows what it leaves ungrouped).

    Returns:
      {"group_by", "threshold" (of the near rule, measured even when grouping by text),
      "records", "text_groups", "near_groups" (per category and "total"), "near_reworded"
      (records whose near group holds another wording: a text not identical to theirs),
      "largest_near_group", "repeated_records" (records that repeat another record of their
      category, instruction, input and response alike: copies beyond the first), and
      "cross_category_texts" (instruction texts under two or more categories;
      `sparcom_jax.data.records.find_duplicates`)}. Linear in the records once the groups are found (the pairs that
      the rule joins directly grow as k (k - 1) / 2 for a template slot of k fillers; `near_pairs`
      lists them).
    """
    text = group_keys(records, "text")
    near = _near_groups(records, text, threshold)
    wordings: dict[tuple[str, str], set[str]] = {}
    for r, t, k in zip(records, text, near):
        wordings.setdefault((r.category, k), set()).add(t)

    def per_cat(keys):
        got = {c: len({k for r, k in zip(records, keys) if r.category == c}) for c in CATEGORIES}
        return {**got, "total": sum(got.values())}

    sizes = Counter((r.category, k) for r, k in zip(records, near))
    repeated, crossed = find_duplicates(records)
    return {"group_by": by, "threshold": threshold, "records": len(records),
            "text_groups": per_cat(text), "near_groups": per_cat(near),
            "near_reworded": sum(len(wordings[r.category, k]) > 1 for r, k in zip(records, near)),
            "largest_near_group": max(sizes.values(), default=0),
            "repeated_records": sum(len(g) - 1 for g in repeated), "cross_category_texts": len(crossed)}


def _rank(seed: int, category: str, key: str) -> str:
    return hashlib.sha256(f"{seed}\0{category}\0{key}".encode()).hexdigest()


def _linked_groups(records: Sequence[Record], keys: Sequence[str]) -> dict[tuple[str, str], tuple[str, str]]:
    """The groups (category, key) that share an identical instruction text (`group_key`) with a
    group of another category, joined (union-find): {group: the first group of its set}, for the
    groups so joined only (none in records without such texts)."""
    by_text: dict[str, list[tuple[str, str]]] = {}
    for r, k in zip(records, keys):
        g = (r.category, k)
        at = by_text.setdefault(group_key(r), [])
        if g not in at:
            at.append(g)
    index: dict[tuple[str, str], int] = {}  # the groups on a text of several categories, numbered
    pairs = []
    for at in by_text.values():
        if len({c for c, _ in at}) > 1:
            ids = [index.setdefault(g, len(index)) for g in at]
            pairs += [(ids[0], i) for i in ids[1:]]
    groups = list(index)
    return {g: groups[r] for g, r in zip(groups, _joined(len(groups), pairs))}


def split_records(records: Sequence[Record], fractions: Mapping[str, float], seed: int = 0,
                  by: GroupBy = "text", threshold: float = NEAR_THRESHOLD) -> dict[str, list[Record]]:
    """Cut `records` into disjoint parts with the given shares of every category.

    Within each category, the groups of records (`group_keys`) are ordered by a seeded
    hash of their key and dealt out in that order: a group goes to the part furthest
    below its target share of the category's records (ties to the earlier part). Parts
    keep the input order of their records.

    An instruction text under two or more categories (`group_key`, case and spacing ignored)
    keeps all its records in one part: the groups holding it are linked across categories, and
    a linked group follows the part its set got in the first category (in `CATEGORIES` order)
    that dealt one of them; in a later category such groups are placed before the others are
    dealt, so the deal of the rest makes up for them. Records without such texts are dealt as
    before the links existed (the same parts for the same records, seed and grouping).

    Args:
      records: the records (unique ids).
      fractions: {part name: share}; shares > 0, summing to 1 (within 1e-6).
      seed: the split's seed.
      by, threshold: the grouping (`group_keys`).

    Returns:
      {part name: records}, in the order of `fractions`.

    Raises:
      ValueError: on shares that are not positive or do not sum to 1.
    """
    names = list(fractions)
    shares = [float(fractions[n]) for n in names]
    if not names or any(s <= 0 for s in shares) or abs(sum(shares) - 1.0) > 1e-6:
        raise ValueError(f"split shares {dict(fractions)} must be > 0 and sum to 1")
    keys = group_keys(records, by, threshold)
    linked = _linked_groups(records, keys)
    placed: dict[tuple[str, str], int] = {}  # a linked set -> its part, once one of its groups is dealt
    where: dict[str, str] = {}
    for cat in CATEGORIES:
        groups: dict[str, list[Record]] = {}
        for r, k in zip(records, keys):
            if r.category == cat:
                groups.setdefault(k, []).append(r)
        total = sum(len(g) for g in groups.values())
        got = [0] * len(names)
        order = sorted(groups, key=lambda k: _rank(seed, cat, k))
        # Groups whose set an earlier category placed go first: the free ones then make up for them.
        first = [k for k in order if linked.get((cat, k)) in placed] + \
                [k for k in order if linked.get((cat, k)) not in placed]
        for key in first:
            link = linked.get((cat, key))
            if link in placed:
                j = placed[link]
            else:  # the part with the largest shortfall against its target share
                j = max(range(len(names)), key=lambda i: (shares[i] * total - got[i], -i))
                if link is not None:
                    placed[link] = j
            got[j] += len(groups[key])
            for r in groups[key]:
                where[r.id] = names[j]
    out: dict[str, list[Record]] = {n: [] for n in names}
    for r in records:
        out[where[r.id]].append(r)
    return out


def split_summary(parts: Mapping[str, Sequence[Record]]) -> dict[str, dict[str, int]]:
    """{part: {category: records}}: what a report records about a split."""
    return {name: {c: sum(r.category == c for r in recs) for c in CATEGORIES} for name, recs in parts.items()}
