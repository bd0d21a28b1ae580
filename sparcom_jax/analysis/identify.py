"""Step 1 of SPARCOM: instruction-specific units per instruction and per category.

A *unit* is one (layer, neuron) pair for ISNs (``neuron_active``; shared-expert
neurons of MoE models use the same dense rule), one (layer, expert) pair for ISEs
(``expert_routed``) and one (layer, expert, neuron) triple for MoE expert neurons
(``expert_neuron_active``, frequency = count / T as in METHOD.md).

Counts are read in chunks of instructions: the per-instruction threshold depends
on that instruction's row only, so chunking is exact, and host memory stays at
one chunk of float32 frequencies plus the boolean results.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from sparcom_jax.analysis.common import C, SECTIONS, category_labels
from sparcom_jax.categories import CATEGORIES
from sparcom_jax.stats.counts import Counts

_RULES = ("top", "absolute")
_AGGREGATIONS = ("consensus", "pooled")
# Float guard for k = ceil(eps * U) and the consensus vote count: 0.07 * 100 is
# 7.000000000000001 in binary floating point and must give k = 7, not 8.
_TOL = 1e-9


@dataclasses.dataclass(frozen=True)
class IdentifyConfig:
    """How instruction-specific units are chosen (recorded in every output).

    Attributes:
      rule: "top" keeps, per instruction, the top `eps` share of all units of the
        model (all layers together), ties included; "absolute" keeps units with
        frequency >= `threshold`.
      eps: the top share for rule="top". Default 0.01 (1 %): sparse enough that a
        unit is specific to what the instruction asks (gate>0 fires on a large
        share of tokens for most SwiGLU neurons, so low thresholds select most
        of the model), large enough (~3.5k neurons per instruction in a 7B
        model) for stable overlap statistics.
      threshold: the frequency threshold for rule="absolute".
      aggregation: "consensus" puts a unit in S(c) when it is in S(I) for at least
        a fraction `q` of c's instructions; "pooled" applies the rule to the
        category's mean frequency.
      q: the consensus fraction, in (0, 1].
      eps_experts: top share for ISEs (``expert_routed``) when it should differ
        from `eps` (models with few experts per layer); None = `eps`.
      chunk: instructions read at a time (memory only; results do not depend on it).
    """

    rule: str = "top"
    eps: float = 0.01
    threshold: float = 0.5
    aggregation: str = "consensus"
    q: float = 0.5
    eps_experts: float | None = None
    chunk: int = 64

    def __post_init__(self):
        if self.rule not in _RULES:
            raise ValueError(f"rule must be one of {_RULES}, got {self.rule!r}")
        if self.aggregation not in _AGGREGATIONS:
            raise ValueError(
                f"aggregation must be one of {_AGGREGATIONS}, got {self.aggregation!r}"
            )
        for name in ("eps", "eps_experts"):
            v = getattr(self, name)
            if v is not None and not 0.0 < v <= 1.0:
                raise ValueError(f"{name} must be in (0, 1], got {v}")
        if not 0.0 < self.q <= 1.0:
            raise ValueError(f"q must be in (0, 1], got {self.q}")
        if self.chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {self.chunk}")

    def eps_for(self, field: str) -> float:
        """The top share used for `field`."""
        if field == "expert_routed" and self.eps_experts is not None:
            return self.eps_experts
        return self.eps

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


def top_k(eps: float, n_units: int) -> int:
    """k = ceil(eps * n_units), at least 1 and at most n_units."""
    return min(n_units, max(1, math.ceil(eps * n_units - _TOL)))


def select_units(freq: np.ndarray, cfg: IdentifyConfig, field: str = "neuron_active") -> np.ndarray:
    """Apply the identification rule row by row.

    Args:
      freq: float [n, *U] frequencies, one row per instruction (or category).
      cfg: the rule.
      field: count field (picks `eps_experts` for ISEs).

    Returns:
      bool [n, *U]. With rule="top", row r keeps every unit whose value is >= the
      k-th largest value of the row (so ties at the cut are all kept and a row
      may hold more than k units). Units with frequency 0 are never selected: a
      unit that never fired cannot be specific to the instruction (this also
      keeps empty rows, e.g. instructions with no counted tokens, empty).
    """
    freq = np.asarray(freq)
    n = freq.shape[0]
    flat = freq.reshape(n, -1)
    if cfg.rule == "absolute":
        sel = flat >= cfg.threshold
    else:
        u = flat.shape[1]
        k = top_k(cfg.eps_for(field), u)
        # np.partition is O(U) per row where a sort would be O(U log U).
        kth = np.partition(flat, u - k, axis=1)[:, u - k]
        sel = flat >= kth[:, None]
    sel &= flat > 0
    return sel.reshape(freq.shape)


@dataclasses.dataclass
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

    @property
    def n(self) -> int:
        return int(self.labels.shape[0])

    @property
    def n_units(self) -> int:
        return int(np.prod(self.unit_shape))

    @property
    def section(self) -> str:
        return SECTIONS[self.field]

    def sets(self) -> dict[str, np.ndarray]:
        """{category: bool [*U]} in CATEGORIES order."""
        return {c: self.category_sets[i] for i, c in enumerate(CATEGORIES)}

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


def _field_array(counts: Counts, field: str):
    arr = getattr(counts, field, None)
    if arr is None:
        raise ValueError(f"these counts have no {field!r} (dense model or not collected)")
    return arr


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
    shape = tuple(_field_array(counts, field).shape[1:])
    n_units = int(np.prod(shape))
    out = (np.zeros((counts.n, (n_units + 7) // 8), np.uint8) if packed
           else np.zeros((counts.n,) + shape, bool))
    for s, freq in counts.iter_frequencies(field, cfg.chunk):
        sel = select_units(freq, cfg, field)
        out[s:s + sel.shape[0]] = np.packbits(sel.reshape(sel.shape[0], -1), axis=1) if packed else sel
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
    cfg = cfg or IdentifyConfig()
    arr = _field_array(counts, field)
    shape = tuple(arr.shape[1:])
    n_units = int(np.prod(shape))
    labels = category_labels(counts.categories)
    if labels.shape[0] != counts.n:
        raise ValueError(f"{labels.shape[0]} categories for {counts.n} instructions")

    bits = None
    if keep_instruction_sets:
        bits = (np.zeros((counts.n, (n_units + 7) // 8), np.uint8) if packed
                else np.zeros((counts.n,) + shape, bool))
    votes = np.zeros((C, n_units), np.int64)      # instructions of c selecting the unit
    freq_sum = np.zeros((C, n_units), np.float64)  # float64: sums over up to N rows
    sizes = np.zeros(counts.n, np.int64)
    for s, freq in counts.iter_frequencies(field, cfg.chunk):
        n = freq.shape[0]
        flat = freq.reshape(n, -1)
        sel = select_units(flat, cfg, field)
        sizes[s:s + n] = sel.sum(1)
        lab = labels[s:s + n]
        for c in np.unique(lab):
            rows = lab == c
            votes[c] += sel[rows].sum(0)
            freq_sum[c] += flat[rows].sum(0, dtype=np.float64)
        if bits is not None:
            bits[s:s + n] = np.packbits(sel, axis=1) if packed else sel.reshape((n,) + shape)

    n_c = np.bincount(labels, minlength=C)
    mean = (freq_sum / np.maximum(n_c, 1)[:, None]).astype(np.float32)
    if cfg.aggregation == "consensus":
        sets = (votes >= cfg.q * n_c[:, None] - _TOL) & (n_c[:, None] > 0)
    else:
        sets = select_units(mean, cfg, field)  # all-zero rows (empty categories) stay empty
    return Identification(
        field=field, config=cfg, unit_shape=shape, labels=labels,
        category_sets=sets.reshape((C,) + shape), category_mean=mean.reshape((C,) + shape),
        n_per_category=n_c, instruction_size=sizes, instruction_bits=bits, packed=packed,
        ids=None if counts.ids is None else list(counts.ids),
    )


def category_sets(
    counts: Counts, field: str = "neuron_active", cfg: IdentifyConfig | None = None,
) -> dict[str, np.ndarray]:
    """S(c) for the six categories: {category: bool [*U]} in CATEGORIES order."""
    return identify(counts, field, cfg, keep_instruction_sets=False).sets()
