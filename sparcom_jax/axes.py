"""The axis letters of sparcom_jax: one vocabulary, used in every shape suffix and einsum.

Names carry their shape as a suffix of these letters (``x_BTD``, ``counts_NLF``) and
einsum strings use the same letters (``"BTD,DF->BTF"``). A letter means one thing
everywhere in the package; modules say "axis letters: see `sparcom_jax.axes`" instead
of redefining them.

========  ================================================================
letter    meaning
========  ================================================================
``A``     micro-batches of one optimizer step (gradient accumulation)
``B``     batch rows (sequences in one device batch)
``T``     token positions of a sequence (queries, in attention)
``S``     key positions in attention (``T`` for self-attention; fewer for a
          query block that sees only earlier keys)
``D``     model width (hidden size)
``H``     query heads
``K``     key/value heads
``R``     query heads per key/value head (``H // K``, the GQA group)
``d``     head width (written ``Dh`` in prose and configs)
``V``     vocabulary
``L``     layers
``F``     FFN neurons of a dense FFN or of an MoE's shared expert
``E``     routed experts
``k``     experts chosen per token (top-k)
``G``     FFN neurons of one routed expert (``F_e`` in METHOD.md)
``X``     flattened tokens of a batch (``B * T``), inside the MoE layer
``M``     token-expert assignments (``X * k``), sorted by expert
``C``     instruction categories (always in `CATEGORIES` order), or the
          per-expert capacity in the capacity-buffer MoE path (never both
          in one function)
``N``     instructions (records, sequences) of a run
``U``     flattened units of one count field (e.g. ``L * F``)
``P``     permutations or bootstrap replicates
========  ================================================================

Count fields (METHOD.md step 1) and their per-instruction shapes:

- ``tokens`` ``[N]``: counted tokens T(I);
- ``neuron_active`` ``[N, L, F]``: tokens on which a dense (or shared-expert) neuron is active;
- ``expert_routed`` ``[N, L, E]``: tokens whose top-k holds the expert;
- ``expert_neuron_active`` ``[N, L, E, G]``: tokens routed to the expert on which its neuron is active.

Optional float sums beside them (tie-breaks and strength, see `sparcom_jax.stats.counts`):
``neuron_act_sum`` ``[N, L, F]``, ``expert_weight_sum`` ``[N, L, E]``,
``expert_neuron_act_sum`` ``[N, L, E, G]``.
"""

AXES: dict[str, str] = {
    "A": "micro-batches of one optimizer step",
    "B": "batch rows",
    "T": "token positions (queries)",
    "S": "key positions in attention",
    "D": "model width",
    "H": "query heads",
    "K": "key/value heads",
    "R": "query heads per key/value head (GQA group)",
    "d": "head width",
    "V": "vocabulary",
    "L": "layers",
    "F": "dense / shared-expert FFN neurons",
    "E": "routed experts",
    "k": "experts per token",
    "G": "FFN neurons of one routed expert",
    "X": "flattened tokens B*T (MoE)",
    "M": "token-expert assignments X*k",
    "C": "categories, or per-expert capacity (MoE capacity path)",
    "N": "instructions of a run",
    "U": "flattened units of one count field",
    "P": "permutations or bootstrap replicates",
}
