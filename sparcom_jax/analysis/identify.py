"""Step 1 of SPARCOM: instruction-specific units per instruction and per category.

A *unit* is one (layer, neuron) pair for ISNs (``neuron_active``; shared-expert
neurons of MoE models use the same dense rule), one (layer, expert) pair for ISEs
(``expert_routed``) and one (layer, expert, neuron) triple for MoE expert neurons
(``expert_neuron_active``, frequency = count / T as in METHOD.md).

Counts are read in chunks of instructions: the per-instruction threshold depends
on that instruction's row only, so chunking is exact, and host memory stays at
one chunk of float32 frequencies plus the boolean results. Several rules can be
applied in one pass over the counts (`identify_all`: the main rule and its
contrast rule).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Literal, Sequence

import numpy as np

from sparcom_jax.analysis.common import C, SECTIONS, by_category, category_labels
from sparcom_jax.categories import absent_categories, per_category_text
from sparcom_jax.stats.counts import Counts

_RULES = ("top", "absolute")
_AGGREGATIONS = ("consensus", "pooled")
_TIES = ("keep", "break")
# Float guard for k = ceil(eps * U) and the consensus vote count: 0.07 * 100 is
# 7.000000000000001 in binary floating point and must give k = 7, not 8.
_TOL = 1e-9
# Rows per mean_active call when reading tie-break strengths (bounds its float64 temporaries).
_STRENGTH_ROWS = 8


@dataclasses.dataclass(frozen=True)
class IdentifyConfig:
    """How instruction-specific units are chosen (recorded in every output).

    Attributes:
      rule: "top" keeps, per instruction, the top `eps` share of all units of the
        model (all layers together); "absolute" keeps units with frequency >=
        `threshold`.
      eps: the top share for rule="top". Default 0.01 (1 %): sparse enough that a
        unit is specific to what the instruction asks (gate>0 fires on a large
        share of tokens for most SwiGLU neurons, so low thresholds select most
        of the model), large enough (~3.5k neurons per instruction in a 7B
        model) for stable overlap statistics.
      threshold: the frequency threshold for rule="absolute", and of the
        absolute contrast rule reported beside rule="top" (`contrast_config`).
        Default 0.5: a unit is counted when it is active on at least half of the
        instruction's tokens. The value is a share of tokens, so it means the
        same for short and long prompts, and it is fixed before looking at any
        model, so the number of units above it can grow or shrink with
        fine-tuning (under rule="top" the number is fixed by construction).
      aggregation: "consensus" puts a unit in S(c) when it is in S(I) for at least
        a fraction `q` of c's instructions; "pooled" applies the rule to the
        category's mean frequency.
      q: the consensus fraction, in (0, 1].
      eps_experts: top share for ISEs (``expert_routed``) when it should differ
        from `eps` (models with few experts per layer); None = `eps`.
      ties: what rule="top" does with units tied at the cut. "keep" (default,
        the paper's rule) keeps every unit whose frequency equals the k-th
        largest, so |S(I)| can exceed k: frequencies of a T-token prompt take
        only T + 1 values, and short prompts tie often. "break" keeps exactly
        k = ceil(eps * U) units (fewer only when fewer than k units fired),
        breaking ties at the cut by the mean activation on active tokens
        (router probability on routed tokens for ISEs), then by the lower unit
        index; the counts must carry the activation sums. With
        aggregation="pooled" the category set is cut the same way on the
        category mean frequency, ties broken by the category mean of that
        strength.
      chunk: instructions read at a time (memory only; results do not depend on it).
    """

    rule: Literal["top", "absolute"] = "top"
    eps: float = 0.01
    threshold: float = 0.5
    aggregation: Literal["consensus", "pooled"] = "consensus"
    q: float = 0.5
    eps_experts: float | None = None
    ties: Literal["keep", "break"] = "keep"
    # Memory only: two analyses read in other chunks are the same rule (compared, hashed).
    chunk: int = dataclasses.field(default=64, compare=False)

    def __post_init__(self):
        for name, allowed in (("rule", _RULES), ("aggregation", _AGGREGATIONS), ("ties", _TIES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.ties == "break" and self.rule != "top":
            raise ValueError("ties='break' applies to rule='top' only (an absolute threshold has "
                             "no cut to break ties at); use ties='keep'")
        for name in ("eps", "eps_experts", "q", "threshold"):  # ('1%' failed as "'<' not supported ...")
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, numbers.Real)):
                raise ValueError(f"{name} must be a number, a share of 1 (0.01 for 1 %), got {v!r}")
        for name in ("eps", "eps_experts"):
            v = getattr(self, name)
            if v is not None and not 0.0 < v <= 1.0:
                raise ValueError(f"{name} must be in (0, 1], got {v}")
        if not 0.0 < self.q <= 1.0:
            raise ValueError(f"q must be in (0, 1], got {self.q}")
        if not 0.0 <= self.threshold <= 1.0:  # a share of tokens: above 1 no unit could reach it
            raise ValueError(f"threshold must be in [0, 1], got {self.threshold}")
        if self.chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {self.chunk}")

    def eps_for(self, field: str) -> float:
        """The top share used for `field`."""
        return self._share(self.eps, self.eps_experts, field)

    @staticmethod
    def _share(eps: Any, eps_experts: float | None, field: str | None) -> Any:
        """The top share of `field` under `eps` and `eps_experts`: the latter for ISEs when set."""
        return eps_experts if field == "expert_routed" and eps_experts is not None else eps

    @staticmethod
    def parameters_used(rule: dict[str, Any], field: str | None) -> dict[str, Any]:
        """`rule` (a `to_dict`, of this or an earlier sparcom_jax) without the parameters the
        sets of `field` do not depend on: the top share for the field (`eps_for`) is kept as
        "eps", and under rule "absolute" the threshold replaces eps and ties (under "top" the
        threshold is the contrast rule's). Other keys are kept as they are, so that a rule
        stored by an earlier version compares as it did."""
        used = dict(rule)
        eps = IdentifyConfig._share(used.get("eps"), used.pop("eps_experts", None), field)
        if eps is not None:  # a rule without eps stays without
            used["eps"] = eps
        for k in ("eps", "ties") if used.get("rule") == "absolute" else ("threshold",):
            used.pop(k, None)
        return used

    @property
    def needs_strength(self) -> bool:
        """Whether the rule reads the activation sums (exact-k tie-break)."""
        return self.rule == "top" and self.ties == "break"

    def to_dict(self) -> dict[str, Any]:
        """The rule and its parameters, JSON-safe (chunk is left out: no effect)."""
        d = dataclasses.asdict(self)
        d.pop("chunk")
        d["zero_frequency_selected"] = False
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "IdentifyConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def describe(self) -> str:
        """The rule in one line, e.g. "top eps=0.01 (ties keep), consensus q=0.5"."""
        if self.rule == "top":
            experts = "" if self.eps_experts is None else f" (experts {self.eps_experts:g})"
            rule = f"top eps={self.eps:g}{experts} (ties {self.ties})"
        else:
            rule = f"absolute threshold={self.threshold:g}"
        return rule + (f", consensus q={self.q:g}" if self.aggregation == "consensus" else ", pooled")


# What each rule's set sizes can and cannot show; repeated in summary.json and the report.
RULE_SUPPORT: dict[str, str] = {
    "top": ("Top-eps (rule='top') gives every instruction about the same number of units, "
            "k = ceil(eps x units), so it shows WHICH units are specific and how the sets overlap "
            "(within vs across categories; retained, gained and lost between models). It cannot show "
            "that fine-tuning changes the NUMBER of specific units: eps sets that number, not the model."),
    "absolute": ("An absolute threshold (rule='absolute') counts the units active on at least a fixed "
                 "share of an instruction's tokens, so the count can grow or shrink: it can show whether "
                 "MORE units pass a fixed frequency after fine-tuning. Read it beside the shift of the "
                 "mean frequency over all units (comparison frequency_shift): when every unit fires more "
                 "often, the count grows without any unit becoming more specific."),
}


def contrast_config(cfg: IdentifyConfig) -> IdentifyConfig:
    """The rule reported beside `cfg`: absolute (at `cfg.threshold`) beside top-eps, and
    top-eps (at `cfg.eps`, ties kept) beside absolute; aggregation, q and eps_experts stay."""
    return dataclasses.replace(cfg, rule="absolute" if cfg.rule == "top" else "top", ties="keep")


def select_units(
    freq: np.ndarray, cfg: IdentifyConfig, field: str = "neuron_active",
    strength: np.ndarray | None = None,
) -> np.ndarray:
    """Apply the identification rule row by row.

    Args:
      freq: float [n, *U] frequencies, one row per instruction (or category).
      cfg: the rule.
      field: count field (picks `eps_experts` for ISEs).
      strength: float [n, *U] tie-break values (mean activation on active
        tokens); read only by rule="top" with ties="break".

    Returns:
      bool [n, *U]. With rule="top" and ties="keep", row r keeps every unit whose
      value is >= the k-th largest value of the row (so ties at the cut are all
      kept and a row may hold more than k units). With ties="break" it keeps
      the units above the k-th largest value and fills up to exactly k from
      the units equal to it, by larger strength, then lower flat unit index.
      Units with frequency 0 are never selected: a unit that never fired cannot
      be specific to the instruction (this also keeps empty rows, e.g.
      instructions with no counted tokens, empty, and leaves fewer than k units
      when fewer than k fired).

    Raises:
      ValueError: ties="break" without `strength`.
    """
    freq = np.asarray(freq)
    n = freq.shape[0]
    flat = freq.reshape(n, -1)
    if cfg.rule == "absolute":
        sel = flat >= cfg.threshold
    else:
        u = flat.shape[1]
        k = min(u, max(1, math.ceil(cfg.eps_for(field) * u - _TOL)))  # ceil(eps * U), in [1, U]
        # np.partition is O(U) per row where a sort would be O(U log U).
        kth = np.partition(flat, u - k, axis=1)[:, u - k]
        if cfg.ties == "keep":
            sel = flat >= kth[:, None]
        else:
            if strength is None:
                raise ValueError("ties='break' needs the tie-break strength (activation sums)")
            strength = np.asarray(strength).reshape(n, -1)
            sel = flat > kth[:, None]  # fewer than k units lie strictly above the k-th value
            for r in np.flatnonzero(kth > 0):
                tied = np.flatnonzero(flat[r] == kth[r])
                # NaN strength (a corrupt sum) ranks below every real value.
                neg = -np.nan_to_num(strength[r, tied].astype(np.float64), nan=-np.inf)
                order = np.lexsort((tied, neg))  # strength descending, then index
                sel[r, tied[order[:k - int(sel[r].sum())]]] = True
    sel &= flat > 0
    return sel.reshape(freq.shape)


@dataclasses.dataclass(repr=False)
class Identification:
    """Instruction and category sets of one count field.

    Attributes:
      field: the count field ("neuron_active", "expert_routed", "expert_neuron_active").
      config: the rule used.
      unit_shape: U, e.g. (L, F).
      labels: int [N] category index of each instruction (into CATEGORIES).
      category_sets: bool [C, *U] S(c), rows in CATEGORIES order.
      category_mean: float32 [C, *U] mean frequency p(c) over c's instructions.
      n_per_category: int [C] instructions per category.
      instruction_size: int [N] |S(I)|.
      instruction_bits: bool [N, *U], or uint8 [N, ceil(U/8)] when `packed`, or
        None once dropped to save memory.
      packed: whether instruction_bits is np.packbits-packed along flattened U.
      ids: record ids (optional).
      tokens: int [N] counted tokens T(I), or None.
      sources: record sources, length N (optional).
      groups: record group keys, length N (optional; `Counts.groups`).
    """

    field: str
    config: IdentifyConfig
    unit_shape: tuple[int, ...]
    labels: np.ndarray
    category_sets: np.ndarray
    category_mean: np.ndarray
    n_per_category: np.ndarray
    instruction_size: np.ndarray
    instruction_bits: np.ndarray | None = None
    packed: bool = False
    ids: list[str] | None = None
    tokens: np.ndarray | None = None
    sources: list[str] | None = None
    groups: list[str] | None = None

    @property
    def n(self) -> int:
        return int(self.labels.shape[0])

    @property
    def n_units(self) -> int:
        return int(np.prod(self.unit_shape))

    @property
    def section(self) -> str:
        return SECTIONS[self.field]

    def __repr__(self) -> str:
        shape = ", ".join(map(str, self.unit_shape))
        absent = absent_categories(self.n_per_category)
        kept = ("dropped" if self.instruction_bits is None
                else f"kept [{self.n}, {self.n_units}]" + (" bit-packed" if self.packed else ""))
        return "\n".join([
            f"Identification: {self.field}, units [{shape}] ({self.n_units:,} in all), {self.n} instructions",
            f"  rule              {self.config.describe()}",
            f"  |S(c)|            {per_category_text(self.category_sets.reshape(C, -1).sum(1), absent)}",
            f"  instruction sets  {kept}",
        ])

    def sets(self) -> dict[str, np.ndarray]:
        """{category: bool [*U]} in CATEGORIES order."""
        return by_category(self.category_sets)

    def unit_frequency(self) -> np.ndarray:
        """float64 [*U] mean frequency of each unit over all N instructions."""
        n_c = self.n_per_category.astype(np.float64)
        mean = self.category_mean.reshape(C, -1).astype(np.float64)
        return (n_c @ mean / max(self.n, 1)).reshape(self.unit_shape)

    def instruction_rows(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """bool [n, U_flat] instruction sets of rows [start, stop), unpacked."""
        if self.instruction_bits is None:
            raise ValueError(
                "instruction sets were dropped; identify with keep_instruction_sets=True"
            )
        stop = self.n if stop is None else stop
        rows = self.instruction_bits[start:stop]
        if self.packed:
            return np.unpackbits(rows, axis=1, count=self.n_units).astype(bool)
        return np.asarray(rows).reshape(rows.shape[0], -1)

    def instruction_sets(self) -> np.ndarray:
        """bool [N, *U] all instruction sets (unpacks when packed)."""
        return self.instruction_rows().reshape((self.n,) + self.unit_shape)

    def drop_instruction_sets(self) -> None:
        """Free the [N, *U] instruction sets (category-level results stay)."""
        self.instruction_bits = None


_COMPARE_HINT = ("to compare two models, analyse each one (sj.analyze_model(counts, rule, name=...)) and "
                 "pass the two analyses to sj.compare_models")


def check_inputs(counts: Any, cfg: Any, where: str) -> None:
    """Refuse arguments in the wrong place before any work, naming the fix.

    The slips a notebook user makes: two models' counts in one call (identification is of
    one model; comparing is `compare_models`), or a bare number where the rule goes.

    Raises:
      TypeError: `counts` is not one `Counts`, or `cfg` is neither None nor an IdentifyConfig.
    """
    if not isinstance(counts, Counts):
        raise TypeError(f"{where}: counts must be one model's Counts (from sj.collect_instructions, "
                        f"sj.collect_counts or sj.open_counts), got {type(counts).__name__}; {_COMPARE_HINT}")
    if cfg is None or isinstance(cfg, IdentifyConfig):
        return
    if isinstance(cfg, Counts):
        raise TypeError(f"{where}: the second argument is the rule (an IdentifyConfig), got a second Counts; "
                        f"{_COMPARE_HINT}")
    example = f"eps={cfg!r}" if isinstance(cfg, (int, float)) and not isinstance(cfg, bool) else "eps=0.01"
    raise TypeError(f"{where}: the rule must be an IdentifyConfig or None, got {type(cfg).__name__} {cfg!r}; "
                    f"pass sj.IdentifyConfig({example})")


def check_field(counts: Counts, field: Any, where: str = "identify") -> tuple[int, ...]:
    """The unit shape U of `field`, after refusing a field these counts do not have.

    Raises:
      TypeError: `field` is another Counts (two models in one call).
      ValueError: an unknown field name (a section name is pointed to its field), or a
        field these counts lack; naming the fields they have.
    """
    have = ", ".join(counts.arrays()) or "none"
    if isinstance(field, Counts):
        raise TypeError(f"{where}: got a second Counts where the count field goes; {_COMPARE_HINT}")
    if not isinstance(field, str) or field not in SECTIONS:
        section = {sec: f for f, sec in SECTIONS.items()}.get(field) if isinstance(field, str) else None
        raise ValueError(f"{where}: unknown count field {field!r}"
                         + (f" (a section name; its field is {section!r})" if section else "")
                         + f"; the fields are {', '.join(SECTIONS)}, and these counts have {have}")
    arr = getattr(counts, field, None)
    if arr is None:
        raise ValueError(f"{where}: these counts have no {field!r} (dense model or not collected); "
                         f"they have {have}")
    return tuple(arr.shape[1:])


def exact_frequencies(freq: np.ndarray, tokens) -> np.ndarray:
    """float64 [n, U] count / T, from float32 frequencies [n, U] and T [n].

    Category means are sums of these. float32(c / T) rounds differently for different
    counts, so sums of the float32 values split means that are exactly equal (common with
    equal-length prompts) by rounding noise, and a top-eps cut on them would drop tied
    units (or order them by that noise instead of the tie-break). The counts are
    recovered exactly (c <= T, far below 2**23) and divided in float64; rounding the
    mean to float32 once then keeps equal means equal.
    """
    t = np.asarray(tokens, np.float64).reshape(-1, 1)
    out = np.asarray(freq, np.float64) * t  # in place from here: one float64 temporary
    np.rint(out, out=out)
    return np.divide(out, t, out=out, where=t > 0)  # T = 0: the frequencies are 0 already


def consensus_sets(votes: np.ndarray, n_c: np.ndarray, q: float) -> np.ndarray:
    """bool [C, U]: units that at least a fraction q of c's n_c [C] instructions select
    (votes [C, U]: how many, or their resampled weight); empty categories stay empty."""
    return (votes >= q * n_c[:, None] - _TOL) & (n_c[:, None] > 0)


def _check_strength(counts: Counts, field: str, cfgs: Sequence[IdentifyConfig]) -> bool:
    """Whether any rule needs the activation sums; raises when they are missing."""
    if not any(c.needs_strength for c in cfgs):
        return False
    name = Counts.SUM_FIELDS[field]
    if getattr(counts, name, None) is None:
        raise ValueError(
            f"ties='break' breaks ties at the top-eps cut by the mean activation on active tokens, "
            f"but these counts carry no {name!r}: collect the counts with activation sums "
            "(collect_counts(..., sums=True)), or identify with ties='keep'")
    return True


def _strength(counts: Counts, field: str, start: int, stop: int) -> np.ndarray:
    """float32 [n, U_flat] mean activation on active tokens of rows [start, stop), read a
    few rows at a time: Counts.mean_active works in float64 (three [rows, U] arrays)."""
    rows = [counts.mean_active(field, s, min(s + _STRENGTH_ROWS, stop))
            for s in range(start, stop, _STRENGTH_ROWS)]
    return np.concatenate([r.reshape(r.shape[0], -1) for r in rows])


def instruction_sets(
    counts: Counts, field: str = "neuron_active", cfg: IdentifyConfig | None = None,
    *, packed: bool = False,
) -> np.ndarray:
    """S(I) for every instruction.

    Args:
      counts: the counts (numpy or lazily-read arrays).
      field: count field.
      cfg: the rule (default IdentifyConfig()).
      packed: return np.packbits of the flattened sets (8x smaller).

    Returns:
      bool [N, *U], or uint8 [N, ceil(U/8)] when packed.
    """
    cfg = cfg or IdentifyConfig()
    shape = check_field(counts, field)
    strength = _check_strength(counts, field, [cfg])
    out = (np.zeros((counts.n, (int(np.prod(shape)) + 7) // 8), np.uint8) if packed
           else np.zeros((counts.n,) + shape, bool))
    for s, freq in counts.iter_frequencies(field, cfg.chunk):
        n = freq.shape[0]
        sel = select_units(freq, cfg, field, _strength(counts, field, s, s + n) if strength else None)
        out[s:s + n] = np.packbits(sel.reshape(n, -1), axis=1) if packed else sel
    return out


def identify(
    counts: Counts, field: str = "neuron_active", cfg: IdentifyConfig | None = None,
    *, keep_instruction_sets: bool = True, packed: bool = False,
) -> Identification:
    """Instruction sets, category sets and category mean frequencies in one pass.

    Args:
      counts: the counts, with per-instruction `categories`.
      field: count field.
      cfg: the rule (default IdentifyConfig()).
      keep_instruction_sets: keep S(I) for instruction-level analyses (bool
        [N, *U]: 423 MB for 1,200 x 32 x 11008).
      packed: keep S(I) packed with np.packbits (8x smaller, unpacked per chunk).

    Returns:
      An Identification.
    """
    return identify_all(counts, field, [cfg or IdentifyConfig()],
                        keep_instruction_sets=keep_instruction_sets, packed=packed)[0]


def identify_all(
    counts: Counts, field: str, cfgs: Sequence[IdentifyConfig], *,
    keep_instruction_sets: bool | Sequence[bool] = True, packed: bool = False,
) -> list[Identification]:
    """Identify with several rules in one pass over the counts (e.g. a rule and its contrast).

    Args:
      counts: the counts, with per-instruction `categories`.
      field: count field.
      cfgs: the rules; the first one's `chunk` sets the reading chunk.
      keep_instruction_sets: keep S(I), for all rules or per rule.
      packed: keep S(I) bit-packed.

    Returns:
      One Identification per rule, in order.
    """
    cfgs = list(cfgs)
    if not cfgs:
        raise ValueError("identify_all needs at least one rule")
    for c in cfgs:
        check_inputs(counts, c, "identify")
    keep = ([keep_instruction_sets] * len(cfgs) if isinstance(keep_instruction_sets, bool)
            else list(keep_instruction_sets))
    shape = check_field(counts, field)
    n_units = int(np.prod(shape))
    labels = category_labels(counts.categories)
    if labels.shape[0] != counts.n:
        raise ValueError(f"{labels.shape[0]} categories for {counts.n} instructions")
    for name in ("sources", "groups"):
        v = getattr(counts, name)
        if v is not None and len(v) != counts.n:
            raise ValueError(f"{len(v)} {name} for {counts.n} instructions")
    need_strength = _check_strength(counts, field, cfgs)
    pooled = any(c.aggregation == "pooled" for c in cfgs)  # rules that cut the category mean
    pooled_strength = any(c.needs_strength and c.aggregation == "pooled" for c in cfgs)

    bits = [None if not k else (np.zeros((counts.n, (n_units + 7) // 8), np.uint8) if packed
                                else np.zeros((counts.n,) + shape, bool)) for k in keep]
    # Instructions of c selecting the unit (consensus rules only).
    votes = [np.zeros((C, n_units), np.int64) if c.aggregation == "consensus" else None for c in cfgs]
    sizes = [np.zeros(counts.n, np.int64) for _ in cfgs]
    freq_sum = np.zeros((C, n_units), np.float64)  # float64: sums over up to N rows
    strength_sum = np.zeros((C, n_units), np.float64) if pooled_strength else None
    tokens = np.asarray(counts.tokens[:]).astype(np.int64)
    for s, freq in counts.iter_frequencies(field, cfgs[0].chunk):
        n = freq.shape[0]
        flat = freq.reshape(n, -1)
        strength = _strength(counts, field, s, s + n) if need_strength else None
        lab = labels[s:s + n]
        rows = {c: lab == c for c in np.unique(lab)}
        if pooled:  # exact means, a row at a time (one row of float64 temporaries)
            for r in range(n):
                freq_sum[lab[r]] += exact_frequencies(flat[r:r + 1], tokens[s + r:s + r + 1])[0]
        for c, m in rows.items():
            if not pooled:  # the mean is reported, not cut: the plain float32 sum is enough
                freq_sum[c] += flat[m].sum(0, dtype=np.float64)
            if strength_sum is not None:
                strength_sum[c] += strength[m].sum(0, dtype=np.float64)
        for i, cfg in enumerate(cfgs):
            sel = select_units(flat, cfg, field, strength)
            sizes[i][s:s + n] = sel.sum(1)
            if votes[i] is not None:
                for c, m in rows.items():
                    votes[i][c] += sel[m].sum(0)
            if bits[i] is not None:
                bits[i][s:s + n] = np.packbits(sel, axis=1) if packed else sel.reshape((n,) + shape)

    n_c = np.bincount(labels, minlength=C)
    denom = np.maximum(n_c, 1)[:, None]
    mean = (freq_sum / denom).astype(np.float32)
    mean_strength = None if strength_sum is None else (strength_sum / denom).astype(np.float32)
    out = []
    for i, cfg in enumerate(cfgs):
        if cfg.aggregation == "consensus":
            sets = consensus_sets(votes[i], n_c, cfg.q)
        else:  # all-zero rows (empty categories) stay empty
            sets = select_units(mean, cfg, field, mean_strength)
        out.append(Identification(
            field=field, config=cfg, unit_shape=shape, labels=labels,
            category_sets=sets.reshape((C,) + shape), category_mean=mean.reshape((C,) + shape),
            n_per_category=n_c, instruction_size=sizes[i], instruction_bits=bits[i], packed=packed,
            ids=None if counts.ids is None else list(counts.ids), tokens=tokens,
            sources=None if counts.sources is None else list(counts.sources),
            groups=None if counts.groups is None else list(counts.groups),
        ))
    return out


def category_sets(
    counts: Counts, field: str = "neuron_active", cfg: IdentifyConfig | None = None,
) -> dict[str, np.ndarray]:
    """S(c) for the six categories: {category: bool [*U]} in CATEGORIES order."""
    return identify(counts, field, cfg, keep_instruction_sets=False).sets()
