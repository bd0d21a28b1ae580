"""Count containers: what the statistics engine hands to the analysis.

Axis letters: see `sparcom_jax.axes` (N instructions, L layers, F dense or
shared-expert FFN neurons, E experts, G expert neurons).

Arrays are numpy arrays or lazily-read array-likes (a tensorstore view) that
support ``shape``, ``dtype`` and ``__getitem__`` with a slice over N; the
analysis reads them in chunks along N so host memory stays bounded.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any, Iterator

import numpy as np

from sparcom_jax.categories import per_category_text


def array_text(a) -> str:
    """"int32 [12, 2, 64]" for an array or a lazily-read array-like, without reading it."""
    return f"{np.dtype(a.dtype).name} [{', '.join(str(int(d)) for d in a.shape)}]"


@dataclasses.dataclass(repr=False)
class Counts:
    """Per-instruction activation counts (METHOD.md, step 1).

    Attributes:
      tokens: int [N] counted tokens per sequence (T(I)).
      neuron_active: int [N, L, F] tokens with act(gate_proj(x)) > 0 for dense FFNs
        and MoE shared experts, else None.
      expert_routed: int [N, L, E] tokens whose top-k includes expert e (MoE), else None.
      expert_neuron_active: int [N, L, E, G] tokens routed to e on which e's neuron
        is active (MoE), else None.
      ids: record ids, length N (optional).
      categories: canonical category names, length N (optional).
      meta: free-form provenance (model path, scope, template, ...).
      sources: record sources, length N (optional; e.g. "human-written", "template-varied").
      neuron_act_sum: float [N, L, F] sum of A over the counted tokens on which the
        neuron is active (so mean activation on active tokens = sum / count), or None.
      expert_weight_sum: float [N, L, E] sum of the router probability of the expert
        over the counted tokens routed to it, or None.
      expert_neuron_act_sum: float [N, L, E, G] like neuron_act_sum for expert
        neurons (routed tokens only), or None.
      groups: group keys, length N (optional; `sparcom_jax.data.splits.group_id`):
        records with one key share an instruction text, and the bootstrap and the
        permutation test resample them together.

    The three sums are optional (``collect_counts(..., sums=True)``); they carry the
    strength of a unit beside its frequency (tie-breaks of the exact-k rule).
    """

    tokens: Any
    neuron_active: Any = None
    expert_routed: Any = None
    expert_neuron_active: Any = None
    ids: list[str] | None = None
    categories: list[str] | None = None
    meta: dict = dataclasses.field(default_factory=dict)
    sources: list[str] | None = None
    neuron_act_sum: Any = None
    expert_weight_sum: Any = None
    expert_neuron_act_sum: Any = None
    groups: list[str] | None = None

    ARRAY_FIELDS = ("neuron_active", "expert_routed", "expert_neuron_active")
    # The float sum that goes with each count field (same shape).
    SUM_FIELDS = {"neuron_active": "neuron_act_sum", "expert_routed": "expert_weight_sum",
                  "expert_neuron_active": "expert_neuron_act_sum"}

    @property
    def n(self) -> int:
        return int(self.tokens.shape[0])

    def __repr__(self) -> str:
        # What a notebook shows: the shapes and how the counts were made, never the arrays,
        # the record lists or the whole meta (thousands of entries for a real study).
        cats = "" if self.categories is None else f" ({per_category_text(collections.Counter(self.categories))})"
        lines = [f"Counts: {self.n} records{cats}"]
        lines += [f"  {k:<22} {array_text(v)}" for k, v in {"tokens": self.tokens, **self.arrays(),
                                                             **self.sums()}.items()]
        m = self.meta or {}
        made = ", ".join(f"{k} {m[k]!r}" for k in ("model", "dtype", "scope", "template", "max_length")
                         if m.get(k) is not None)
        if made:
            lines.append(f"  {made}")
        c = m.get("compilations")
        if isinstance(c, dict) and m.get("tokens_per_s") is not None:  # did a re-run cell compile again?
            lines.append(f"  collected at {m['tokens_per_s']:,.0f} tokens/s; {c['compilations']} XLA program(s) "
                         f"compiled, {c['cache_hits']} loaded from the on-disk cache ({c['compile_seconds']:.1f} s)")
        lazy = not isinstance(self.tokens, np.ndarray)
        lines.append(f"  read lazily from {m.get('store', 'disk')}" if lazy else "  in memory")
        return "\n".join(lines)

    def arrays(self) -> dict[str, Any]:
        """The non-None count arrays by name."""
        return {k: getattr(self, k) for k in self.ARRAY_FIELDS if getattr(self, k) is not None}

    def sums(self) -> dict[str, Any]:
        """The non-None float sum arrays by name."""
        return {v: getattr(self, v) for v in self.SUM_FIELDS.values() if getattr(self, v) is not None}

    def mean_active(self, field: str, start: int = 0, stop: int | None = None) -> np.ndarray | None:
        """Mean of A on the tokens where the unit is active (or of the router probability
        on routed tokens, for experts) for rows [start, stop) of `field`; 0 where the unit
        never fired; None when the sums were not collected."""
        sums = getattr(self, self.SUM_FIELDS[field])
        if sums is None:
            return None
        stop = self.n if stop is None else stop
        c = np.asarray(getattr(self, field)[start:stop], dtype=np.float64)
        s = np.asarray(sums[start:stop], dtype=np.float64)
        return np.divide(s, c, out=np.zeros_like(s), where=c > 0).astype(np.float32)

    def frequencies(self, field: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Activation frequencies p = count / T for rows [start, stop) of `field`.

        Rows with no counted tokens get frequency 0.
        """
        arr = getattr(self, field)
        if arr is None:
            raise ValueError(f"these counts have no {field!r} (dense model or not collected)")
        stop = self.n if stop is None else stop
        # Divided in place: one float32 array as large as the rows' counts (a second one for the
        # quotient doubled the peak).
        c = np.array(arr[start:stop], dtype=np.float32)
        t = np.asarray(self.tokens[start:stop], dtype=np.float32)
        np.divide(c, np.where(t > 0, t, 1).reshape((-1,) + (1,) * (c.ndim - 1)), out=c)
        c[t == 0] = 0
        return c

    def iter_frequencies(self, field: str, chunk: int = 64) -> Iterator[tuple[int, np.ndarray]]:
        """Yield (start, frequencies of rows [start, start+chunk)) over all N rows."""
        for s in range(0, self.n, chunk):
            yield s, self.frequencies(field, s, min(s + chunk, self.n))

    def to_numpy(self) -> "Counts":
        """A copy with every array read into memory."""
        return dataclasses.replace(
            self,
            tokens=np.asarray(self.tokens[:]),
            **{k: np.asarray(v[:]) for k, v in {**self.arrays(), **self.sums()}.items()},
        )
