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
from sparcom_jax.data.records import Record
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
    return re.sub(r"\s+", " ", record.instruction.strip().lower())


def near_words(record: Record) -> frozenset[str]:
    """The word set that near-duplicate grouping compares: the words of `group_key`, every
    number written as 0 (templates often vary a number: "Calculate 12% of 450.")."""
    return frozenset(_WORD.findall(_NUMBER.sub("0", group_key(record))))


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


def _set_pairs(sets: list[frozenset[str]], threshold: float, chunk: int) -> np.ndarray:
    """The pairs of distinct word sets that the near rule joins: int64 [P, 2] (u, v), u < v.

    An exact similarity join (prefix filtering, as in AllPairs / PPJoin): words are numbered
    rarest first and the sets ordered by size. A joined pair x, y (|y| <= |x|) shares at least
    o >= t |x| and o >= 2t/(1+t) |y| words, so the first |x| - o + 1 words of x and the first
    |y| - o + 1 words of y share one: each set is looked up by its first words (a probe prefix
    for t |x|) among the earlier sets' first words (an index prefix for 2t/(1+t) |y|) of size
    >= t |x|, and only those candidates are counted exactly. Pairs that share no word (possible
    only when t * |x| is within the slack of 0, e.g. a set without words) are checked among
    the sets that could have one, all against all.
    """
    if len(sets) < 2:
        return np.zeros((0, 2), np.int64)
    df = Counter(w for s in sets for w in s)
    number = {w: k for k, w in enumerate(sorted(df, key=lambda w: (df[w], w)))}
    size = np.asarray([len(s) for s in sets], np.int64)
    order = np.argsort(size, kind="stable")  # set ids below are ranks in this order
    size = size[order]
    ptr = np.concatenate([[0], np.cumsum(size)])
    n = size.size
    owner = np.repeat(np.arange(n, dtype=np.int64), size)
    # Each set's word numbers, ascending (rarest first), the sets laid end to end in size order.
    tok = np.asarray([number[w] for i in order.tolist() for w in sets[i]], np.int64)
    tok = tok[np.lexsort((tok, owner))]
    width = int(tok.max()) + 1 if tok.size else 1
    keys = owner * width + tok  # (built once: `_overlaps` looks words up in it for every chunk)
    pos = np.arange(tok.size) - ptr[owner]
    probe_o = _least_overlap(size, threshold)
    probe = pos < (size - np.maximum(probe_o, 1) + 1)[owner]
    index = pos < (size - np.maximum(_least_overlap(size, 2 * threshold / (1 + threshold)), 1) + 1)[owner]
    # Index prefixes by (word, set); with sets in size order, sizes ascend within a word too.
    i_set, i_tok = owner[index], tok[index]
    by = np.lexsort((i_set, i_tok))
    i_set, i_tok = i_set[by], i_tok[by]
    big = int(size[-1]) + 1
    key_set, key_size = i_tok * n + i_set, i_tok * big + size[i_set]
    # Per probe word of x: the earlier sets (rank < x) of size >= t |x| holding it in their index prefix.
    p_set, p_tok = owner[probe], tok[probe]
    lo = np.searchsorted(key_size, p_tok * big + probe_o[p_set])
    count = np.maximum(np.searchsorted(key_set, p_tok * n + p_set) - lo, 0)

    def joined(x, y):  # the exact check of candidate pairs (x, y)
        inter = _overlaps(keys, width, ptr, tok, y, x).astype(np.float64)
        keep = _joins(inter, (size[x] + size[y]).astype(np.float64) - inter, threshold)
        u, v = order[x[keep]], order[y[keep]]
        return np.minimum(u, v) * n + np.maximum(u, v)

    # Sets that may join a set sharing no word with them (the slack): all against all.
    loose = np.flatnonzero(probe_o == 0)
    ly, lx = np.triu_indices(loose.size, 1)
    found = [joined(loose[lx], loose[ly])]
    per_set = np.concatenate([[0], np.cumsum(np.bincount(p_set, count, minlength=n).astype(np.int64))])
    start = 0
    while start < n:  # chunks of whole sets, so that a pair found through two words is checked once
        stop = max(int(np.searchsorted(per_set, per_set[start] + chunk, "right")) - 1, start + 1)
        a, b = np.searchsorted(p_set, [start, stop])
        c = count[a:b]
        x = np.repeat(p_set[a:b], c)
        y = i_set[np.repeat(lo[a:b], c) + np.arange(x.size) - np.repeat(np.cumsum(c) - c, c)]
        cand = _distinct(x * n + y)
        found.append(joined(cand // n, cand % n))
        start = stop
    codes = _distinct(np.concatenate(found))  # the loose sets' pairs may have been candidates too
    return np.stack([codes // n, codes % n], 1)


def _category_joins(records: Sequence[Record], threshold: float, chunk: int):
    """The near rule per category, on distinct word sets: what `near_pairs` expands and
    `_near_links` chains, so that records sharing one word set are handled once as a set.

    Yields, per category with records:
      idx: int64 [n_c], the category's record indices, ascending.
      of: int64 [n_c], each of them's word set (`near_words`), numbered by first appearance.
      n_of: int64 [S], each set's number of records.
      first: int64 [S], each set's first record (index into `records`).
      self_join: bool [S], the sets whose records are all joined to each other (a set with
        words; a word-less set joins nothing).
      u, v: int64 [P], the pairs of distinct sets the rule joins (`_set_pairs`), u < v.
    """
    for cat in CATEGORIES:
        idx = np.asarray([i for i, r in enumerate(records) if r.category == cat], np.int64)
        if not idx.size:
            continue
        ids: dict[frozenset[str], int] = {}
        of, first = [], []
        for i in idx.tolist():
            of.append(ids.setdefault(near_words(records[i]), len(ids)))
            if of[-1] == len(first):  # a new set
                first.append(i)
        of = np.asarray(of, np.int64)
        sets = list(ids)
        words = np.asarray([len(s) for s in sets], np.float64)
        u, v = _set_pairs(sets, threshold, chunk).T
        yield (idx, of, np.bincount(of, minlength=len(sets)), np.asarray(first, np.int64),
               _joins(words, words, threshold), u, v)


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
    for idx, of, n_of, _, self_join, u, v in _category_joins(records, threshold, chunk):
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
        set's records to the first of a set they join), and the first records of every joined
        pair of sets. M <= n + the set pairs, where `near_pairs` lists up to n^2 / 2.
      pairs: how many `near_pairs` join records of different texts (what `grouping_summary`
        reports), counted from the sets' sizes: n_u n_v per joined pair of sets (different
        word sets are different texts), and per joining set the pairs of its records less
        those of one text.
    """
    links, pairs = [np.zeros((0, 2), np.int64)], 0
    for idx, of, n_of, first, self_join, u, v in _category_joins(records, threshold, _CHUNK):
        # The record each record of a set is linked to: the set's first when the set joins itself;
        # for the word-less set, which does not, the first of a set it joins (each of its records
        # joins every record of that set, at a threshold within the slack of 0); else none.
        anchor = np.where(self_join, first, -1)
        alone_u, alone_v = ~self_join[u], ~self_join[v]
        anchor[u[alone_u]], anchor[v[alone_v]] = first[v[alone_u]], first[u[alone_v]]
        to = anchor[of]
        chained = (to >= 0) & (to != idx)
        links += [np.stack([to[chained], idx[chained]], 1), np.stack([first[u], first[v]], 1)]
        n_text = np.asarray(list(Counter(keys[i] for i in idx[self_join[of]].tolist()).values()), np.int64)
        pairs += int((n_of[u] * n_of[v]).sum() + (n_of * (n_of - 1) // 2)[self_join].sum()
                     - (n_text * (n_text - 1) // 2).sum())
    links = np.concatenate(links)
    links.flags.writeable = False  # cached and shared by every caller
    return links, pairs


# The last few `_near_links` results, by the records' (category, `group_key`) and the threshold:
# a run groups one record set many times (its split, every model's counts, the report's data
# section), and the search takes seconds for tens of thousands of records (docs/data.md).
_PAIRS_CACHE: dict[tuple[str, float], tuple[np.ndarray, int]] = {}
_PAIRS_CACHE_SIZE = 4


def _near_links_once(records: Sequence[Record], keys: Sequence[str], threshold: float) -> tuple[np.ndarray, int]:
    """`_near_links(records, keys, threshold)`, computed once for the same records' texts and categories."""
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
    return _near_groups(records, keys, threshold)[0]


def _near_groups(records: Sequence[Record], keys: Sequence[str], threshold: float) -> tuple[list[str], int]:
    """`group_keys(records, "near", threshold)` from the records' `group_key`s `keys`, and the
    count of near pairs joining different texts (`_near_links`)."""
    _check_threshold(threshold)
    links, pairs = _near_links_once(records, keys, threshold)
    parent = list(range(len(records)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first: dict[tuple[str, str], int] = {}
    same_text = [(first.setdefault((r.category, k), i), i) for i, (r, k) in enumerate(zip(records, keys))]
    for i, j in [*same_text, *links.tolist()]:
        a, b = root(i), root(j)
        parent[max(a, b)] = min(a, b)  # the root stays the earliest record of its group
    return [keys[root(i)] for i in range(len(records))], pairs


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
      "records", "text_groups", "near_groups" (per category and "total"), "near_pairs"
      (pairs of records with different texts that the near rule joins directly),
      "largest_near_group"}.
    """
    text = group_keys(records, "text")
    near, pairs = _near_groups(records, text, threshold)

    def per_cat(keys):
        got = {c: len({k for r, k in zip(records, keys) if r.category == c}) for c in CATEGORIES}
        return {**got, "total": sum(got.values())}

    sizes = Counter((r.category, k) for r, k in zip(records, near))
    return {"group_by": by, "threshold": threshold, "records": len(records),
            "text_groups": per_cat(text), "near_groups": per_cat(near),
            "near_pairs": pairs,
            "largest_near_group": max(sizes.values(), default=0)}


def _rank(seed: int, category: str, key: str) -> str:
    return hashlib.sha256(f"{seed}\0{category}\0{key}".encode()).hexdigest()


def split_records(records: Sequence[Record], fractions: Mapping[str, float], seed: int = 0,
                  by: GroupBy = "text", threshold: float = NEAR_THRESHOLD) -> dict[str, list[Record]]:
    """Cut `records` into disjoint parts with the given shares of every category.

    Within each category, the groups of records (`group_keys`) are ordered by a seeded
    hash of their key and dealt out in that order: a group goes to the part furthest
    below its target share of the category's records (ties to the earlier part). Parts
    keep the input order of their records.

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
    where: dict[str, str] = {}
    for cat in CATEGORIES:
        groups: dict[str, list[Record]] = {}
        for r, k in zip(records, keys):
            if r.category == cat:
                groups.setdefault(k, []).append(r)
        total = sum(len(g) for g in groups.values())
        got = [0] * len(names)
        for key in sorted(groups, key=lambda k: _rank(seed, cat, k)):
            # The part with the largest shortfall against its target share.
            j = max(range(len(names)), key=lambda i: (shares[i] * total - got[i], -i))
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
