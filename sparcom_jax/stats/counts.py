"""Count containers: what the statistics engine hands to the analysis.

Axis letters (used across the project): N instructions, L layers, F FFN neurons
(dense FFN or shared expert), E experts, G expert neurons (F_e in METHOD.md).

Arrays are numpy arrays or lazily-read array-likes (a tensorstore view) that
support ``shape``, ``dtype`` and ``__getitem__`` with a slice over N; the
analysis reads them in chunks along N so host memory stays bounded.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator

import numpy as np


@dataclasses.dataclass
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
    """

    tokens: Any
    neuron_active: Any = None
    expert_routed: Any = None
    expert_neuron_active: Any = None
    ids: list[str] | None = None
    categories: list[str] | None = None
    meta: dict = dataclasses.field(default_factory=dict)

    ARRAY_FIELDS = ("neuron_active", "expert_routed", "expert_neuron_active")

    @property
    def n(self) -> int:
        return int(self.tokens.shape[0])

    def arrays(self) -> dict[str, Any]:
        """The non-None count arrays by name."""
        return {k: getattr(self, k) for k in self.ARRAY_FIELDS if getattr(self, k) is not None}

    def frequencies(self, field: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Activation frequencies p = count / T for rows [start, stop) of `field`.

        Rows with no counted tokens get frequency 0.
        """
        arr = getattr(self, field)
        if arr is None:
            raise ValueError(f"these counts have no {field!r} (dense model or not collected)")
        stop = self.n if stop is None else stop
        c = np.asarray(arr[start:stop], dtype=np.float32)
        t = np.asarray(self.tokens[start:stop], dtype=np.float32)
        t = t.reshape((-1,) + (1,) * (c.ndim - 1))
        return np.divide(c, t, out=np.zeros_like(c), where=t > 0)

    def iter_frequencies(self, field: str, chunk: int = 64) -> Iterator[tuple[int, np.ndarray]]:
        """Yield (start, frequencies of rows [start, start+chunk)) over all N rows."""
        for s in range(0, self.n, chunk):
            yield s, self.frequencies(field, s, min(s + chunk, self.n))

    def to_numpy(self) -> "Counts":
        """A copy with every array read into memory."""
        return dataclasses.replace(
            self,
            tokens=np.asarray(self.tokens[:]),
            **{k: np.asarray(v[:]) for k, v in self.arrays().items()},
        )
