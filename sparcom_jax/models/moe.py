"""Mixture-of-Experts FFN with sorted token dispatch (no expert runs on tokens it was not given).

Axis letters: B batch, T tokens, N = B*T flattened tokens, D model width,
E experts, k routed experts per token, M = N*k token-expert assignments,
G expert FFN neurons, S shared-expert neurons.

Routing follows the reference exactly: router logits in the compute dtype,
softmax over all experts in float32, top-k, optional renormalisation of the
chosen k weights. Assignments are sorted by (expert, sequence) so every expert
sees one contiguous group, which each backend multiplies by its own expert's
weights in its best way: `jax.lax.ragged_dot` (TPU), a batched matmul over a
per-expert capacity buffer with an exact ragged_dot fallback (GPU, where
ragged_dot can be rewritten into a dense product over all experts), or
expert-pure tiles (CPU). The same order makes per-(sequence, expert) neuron
counts a one-hot product inside each tile (the CPU expert loop), a sorted segment
sum (other paths on CPU) or a one-hot batched matmul (accelerators).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparcom_jax.models.config import ModelConfig
from sparcom_jax.models.layers import GatedFFN, activation
from sparcom_jax.models.params import HFLayout, ParamDecl, create, linear

# "auto" (decided when the forward is traced): on CPU the expert loop when counting
# (inference) and the differentiable tile scan otherwise; on GPU the capacity-buffer
# batched matmul; on TPU (and anything else) ragged_dot.
MOE_IMPLS = ("auto", "ragged", "tiled", "looped", "capacity")
# Per-expert capacities of the "capacity" path, as multiples of the mean group size M/E:
# the smallest one that holds the largest group is used; past the last, ragged_dot.
# Trained routers are uneven per batch (fine-grained MoEs such as OLMoE or Qwen3-MoE
# more so), hence the 4x branch: a capacity buffer of 4M rows still beats a ragged_dot
# that the backend rewrites into a dense product over all E experts. Set before loading.
CAPACITY_FACTORS = (1.25, 2.0, 4.0)
# Largest tiles of the CPU paths (tile scan, expert loop): measured best on a 2-core CPU.
MAX_TILE = 64
LOOP_TILE = 256
# Tail tiles of the expert loop: at most LOOP_TAIL - 1 wasted rows per expert.
LOOP_TAIL = 16


def route(logits_NE, k: int, norm_topk_prob: bool, drop_E=None):
    """Top-k routing: (weights [N, k] float32, experts [N, k] int32).

    `drop_E` (bool [E], True = removed) takes experts out of the softmax, so the
    remaining experts are renormalised as the router would over a smaller pool.
    """
    logits = logits_NE.astype(jnp.float32)
    if drop_E is not None:
        logits = jnp.where(drop_E[None, :], -jnp.inf, logits)
    probs = jax.nn.softmax(logits, axis=-1)
    w, idx = jax.lax.top_k(probs, k)
    if norm_topk_prob:
        w = w / jnp.sum(w, axis=-1, keepdims=True)
    return w, idx.astype(jnp.int32)


def group_layout(e_sorted_M, group_sizes_E, tile: int):
    """Place expert-sorted rows in a buffer where each expert's group starts on a `tile` boundary.

    Returns (padded [E], starts [E], pos [M]): each group's size rounded up to a
    multiple of `tile`, where each group starts in the buffer, and the buffer row of
    each sorted row. The groups fill at most M + E*(tile-1) rows, a static bound.
    """
    M = e_sorted_M.shape[0]
    padded = (group_sizes_E + tile - 1) // tile * tile
    starts = jnp.cumsum(padded) - padded
    rank = jnp.arange(M, dtype=jnp.int32) - (jnp.cumsum(group_sizes_E) - group_sizes_E)[e_sorted_M]
    return padded, starts, starts[e_sorted_M] + rank


def padded_layout(e_sorted_M, group_sizes_E, max_tile: int):
    """`group_layout` with a tile size tb chosen from the mean group: (tb, padded, starts, pos).

    tb is a power of two near M/E, at least 8 and at most `max_tile`.
    """
    M = e_sorted_M.shape[0]
    E = group_sizes_E.shape[0]
    tb = int(min(max_tile, max(8, 2 ** int(np.log2(max(M // E, 1))))))
    return (tb, *group_layout(e_sorted_M, group_sizes_E, tb))


def expert_neuron_counts(active_MG, seg_sorted_M, inv_M, e_Nk, B: int, E: int, method: str = "auto"):
    """Per-(sequence, expert) active-neuron counts, int32 [B, E, G], from expert-sorted rows.

    "segment": a sorted segment sum over (expert, sequence) segments (cheapest on CPU).
    "matmul": back in token order, a one-hot [E, T*k] x [T*k, G] product per sequence,
    exact (0/1 operands, float32 accumulation, sums far below 2**24) and a plain
    batched matmul on GPU/TPU, where a scatter-add over B*E segments is slow.
    "auto" picks "segment" on CPU and "matmul" elsewhere (decided at trace time).
    """
    if method == "auto":
        method = "segment" if jax.default_backend() == "cpu" else "matmul"
    G = active_MG.shape[-1]
    if method == "segment":
        ena = jax.ops.segment_sum(active_MG.astype(jnp.int32), seg_sorted_M, num_segments=E * B,
                                  indices_are_sorted=True)
        return ena.reshape(E, B, G).transpose(1, 0, 2)
    if method != "matmul":
        raise ValueError(f"unknown count method {method!r}")
    act_BMG = active_MG[inv_M].reshape(B, -1, G).astype(jnp.bfloat16)
    onehot_BME = jax.nn.one_hot(e_Nk.reshape(B, -1), E, dtype=jnp.bfloat16)
    ena = jnp.einsum("BME,BMG->BEG", onehot_BME, act_BMG, preferred_element_type=jnp.float32)
    return ena.astype(jnp.int32)


def _expert_in(name: str, part: int) -> tuple[HFLayout, ...]:
    """Our [E, D, G] gate or up projection: per-expert torch Linears [G, D], or block `part`
    of the fused ``experts.gate_up_proj`` [E, 2G, D] (or its transpose [E, D, 2G])."""
    return (HFLayout(f"experts.{{e}}.{name}.weight", ((2,), (1,)), split=0),
            HFLayout("experts.gate_up_proj", ((0,), (2,), (1,)), part=(1, part, 2)),
            HFLayout("experts.gate_up_proj", ((0,), (1,), (2,)), part=(2, part, 2)))


class MoEFFN(nnx.Module):
    """Routed experts, plus a sigmoid-gated shared expert when the config has one (Qwen-MoE)."""

    PARAMS = {
        # The router's expert axis stays whole on every device: each token's top-k needs all logits.
        "router": ParamDecl(("embed", "route"), (linear("gate.weight"),)),
        "gate_proj": ParamDecl(("experts", "embed", "expert_mlp"), _expert_in("gate_proj", 0)),
        "up_proj": ParamDecl(("experts", "embed", "expert_mlp"), _expert_in("up_proj", 1)),
        "down_proj": ParamDecl(("experts", "expert_mlp", "embed"), (
            HFLayout("experts.{e}.down_proj.weight", ((2,), (1,)), split=0),
            HFLayout("experts.down_proj", ((0,), (2,), (1,))),  # fused [E, D, G]
            HFLayout("experts.down_proj", ((0,), (1,), (2,))))),  # fused, transposed [E, G, D]
        "shared_expert_gate": ParamDecl(("embed", "unit"), (linear("shared_expert_gate.weight"),)),
    }
    CHILDREN = {"shared_expert": ("shared_expert", GatedFFN)}

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32,
                 impl: str = "auto"):
        if impl not in MOE_IMPLS:
            raise ValueError(f"moe_impl {impl!r} is not one of {MOE_IMPLS}")
        D, E, G = cfg.hidden_size, cfg.num_experts, cfg.moe_intermediate_size
        sizes = {"embed": D, "route": E, "experts": E, "expert_mlp": G, "unit": 1}
        create(self, ["router", "gate_proj", "up_proj", "down_proj"], rngs, sizes, param_dtype)
        if cfg.has_shared_expert:
            self.shared_expert = GatedFFN(D, cfg.shared_expert_intermediate_size, cfg.hidden_act, rngs=rngs,
                                          dtype=dtype, param_dtype=param_dtype)
            create(self, ["shared_expert_gate"], rngs, sizes, param_dtype)
        self.has_shared = cfg.has_shared_expert
        self.top_k = cfg.top_k
        self.norm_topk_prob = cfg.norm_topk_prob
        self.act = cfg.hidden_act
        self.dtype = dtype
        self.impl = impl
        self.capacity_factors = tuple(float(f) for f in CAPACITY_FACTORS)
        if LOOP_TILE % LOOP_TAIL:
            raise ValueError(f"LOOP_TILE ({LOOP_TILE}) must be a multiple of LOOP_TAIL ({LOOP_TAIL})")
        self.loop_tiles = (int(LOOP_TILE), int(LOOP_TAIL))

    def _experts_ragged(self, xs_MD, e_sorted, group_sizes, cm_M, keep_EG):
        """Grouped matmuls with `jax.lax.ragged_dot` (efficient grouped GEMMs on GPU/TPU)."""
        dt = self.dtype
        a_MG = activation(self.act)(jax.lax.ragged_dot(xs_MD, self.gate_proj[...].astype(dt), group_sizes))
        active_MG = None if cm_M is None else (a_MG > 0) & cm_M[:, None]
        if keep_EG is not None:
            a_MG = a_MG * keep_EG.astype(dt)[e_sorted]
        h_MG = a_MG * jax.lax.ragged_dot(xs_MD, self.up_proj[...].astype(dt), group_sizes)
        return jax.lax.ragged_dot(h_MG, self.down_proj[...].astype(dt), group_sizes), active_MG

    def _experts_capacity(self, xs_MD, e_sorted, group_sizes, cm_M, keep_EG):
        """Experts as one batched matmul over an [E, C, D] buffer with a static capacity C.

        Expert e's rows (contiguous after the sort) fill the first group_size[e] slots of
        its C-row slab, and the gate/up/down products are plain batched matmuls (what
        GPUs do best, where `ragged_dot` may be rewritten into a dense product over all
        experts). C is chosen at run time from a few compiled capacities (multiples of
        the mean group size M/E): the smallest that holds the largest group. If none
        does, the layer falls back to `ragged_dot`, so no token is ever dropped and the
        result is exactly that of the other paths.
        """
        dt = self.dtype
        M, D = xs_MD.shape
        E = group_sizes.shape[0]
        starts = jnp.cumsum(group_sizes) - group_sizes
        rank = jnp.arange(M, dtype=jnp.int32) - starts[e_sorted]
        wg, wu, wd = (w[...].astype(dt) for w in (self.gate_proj, self.up_proj, self.down_proj))
        keep = None if keep_EG is None else keep_EG.astype(dt)
        act = activation(self.act)

        def with_capacity(C):
            def run(xs_MD):
                c = jnp.arange(C, dtype=jnp.int32)
                valid_EC = c[None, :] < group_sizes[:, None]
                x_ECD = jnp.where(valid_EC[..., None], xs_MD[jnp.minimum(starts[:, None] + c, M - 1)], 0)
                a_ECG = act(jnp.einsum("ECD,EDG->ECG", x_ECD, wg))
                pos_ECG = a_ECG > 0
                if keep is not None:
                    a_ECG = a_ECG * keep[:, None, :]
                y_ECD = jnp.einsum("ECG,EGD->ECD", a_ECG * jnp.einsum("ECD,EDG->ECG", x_ECD, wu), wd)
                slot = e_sorted * C + jnp.minimum(rank, C - 1)
                return y_ECD.reshape(E * C, D)[slot], pos_ECG.reshape(E * C, -1)[slot]
            return run

        def ragged(xs_MD):
            return self._experts_ragged(xs_MD, e_sorted, group_sizes, jnp.ones((M,), bool), keep_EG)

        caps = sorted({min(M, -(-int(np.ceil(f * M / E)) // 8) * 8) for f in self.capacity_factors})
        branch = jnp.searchsorted(jnp.asarray(caps, jnp.int32), jnp.max(group_sizes))
        y_MD, pos_MG = jax.lax.switch(branch, [with_capacity(C) for C in caps] + [ragged], xs_MD)
        return y_MD, None if cm_M is None else pos_MG & cm_M[:, None]

    def _experts_tiled(self, xs_MD, e_sorted, group_sizes, cm_M, keep_EG):
        """Expert MLPs over fixed-size tiles, each tile holding rows of one expert only.

        Each expert's group is padded to a multiple of the tile size `tb`, so the
        padded buffer has a static bound of M + E*(tb-1) rows; a scan over tiles runs
        the gate/up/down matmuls with that tile's expert weights. On CPU this is
        several times faster than `ragged_dot`, which XLA's CPU backend lowers densely.
        """
        dt = self.dtype
        M, D = xs_MD.shape
        E = group_sizes.shape[0]
        tb, padded, starts, pos = padded_layout(e_sorted, group_sizes, MAX_TILE)
        n_tiles = (M + E * (tb - 1)) // tb + 1
        tile_e = jnp.minimum(jnp.searchsorted(starts + padded, jnp.arange(n_tiles) * tb, side="right"), E - 1)
        x_tiles = jnp.zeros((n_tiles * tb, D), dt).at[pos].set(xs_MD).reshape(n_tiles, tb, D)
        wg, wu, wd = (w[...].astype(dt) for w in (self.gate_proj, self.up_proj, self.down_proj))
        keep = None if keep_EG is None else keep_EG.astype(dt)
        act = activation(self.act)

        def tile(_, inp):
            x_tD, e = inp
            a_tG = act(x_tD @ wg[e])
            pos_tG = a_tG > 0
            if keep is not None:
                a_tG = a_tG * keep[e]
            return None, ((a_tG * (x_tD @ wu[e])) @ wd[e], pos_tG)

        _, (y, pos_act) = jax.lax.scan(tile, None, (x_tiles, tile_e))
        y_MD = y.reshape(n_tiles * tb, D)[pos]
        active_MG = None if cm_M is None else pos_act.reshape(n_tiles * tb, -1)[pos] & cm_M[:, None]
        return y_MD, active_MG

    def _experts_looped(self, xs_MD, e_sorted, group_sizes, cm_M, keep_EG, seq_M, B: int, out_needed,
                        real_M=None):
        """Inference-only CPU path: a loop over experts, and inside it over that expert's tiles.

        Each expert's weights are sliced once, and its group runs as full tiles of
        `LOOP_TILE` rows followed by tail tiles of `LOOP_TAIL` rows, so at most
        LOOP_TAIL - 1 padding rows per expert are computed (both sizes are fixed when
        the model is built, as part of its graph). Counting happens in the
        tile: a one-hot [tile, B] x [tile, G] product adds each row's active neurons
        to its sequence (exact: 0/1 operands, float32 sums). With `out_needed` False
        only the gate products run. The inner loops have data-dependent trip counts,
        so this path has no reverse-mode gradient; it is used for counting only.

        Rows with `real_M` False (padding tokens, sorted after every group) are left
        out: they land on a spare buffer row that no tile reads, and their output is 0.

        Returns (y [M, D], counts int32 [B, E, G] or None).
        """
        dt = self.dtype
        M, D = xs_MD.shape
        E = group_sizes.shape[0]
        G = self.gate_proj.shape[-1]
        tb, ts = self.loop_tiles
        padded, starts, pos = group_layout(e_sorted, group_sizes, ts)
        # Groups fill at most M + E*(ts-1) rows; one spare tile past that takes left-out rows.
        n_rows = max(-(-(M + E * (ts - 1)) // ts) * ts + ts, tb)
        if real_M is not None:
            pos = jnp.where(real_M, pos, n_rows - 1)
        x_buf = jnp.zeros((n_rows, D), dt).at[pos].set(xs_MD)
        counting = cm_M is not None
        if counting:
            s_buf = jnp.full((n_rows,), B, jnp.int32).at[pos].set(jnp.where(cm_M, seq_M, B))
        act = activation(self.act)

        def loop(with_y: bool):
            def expert(e, carry):
                wg, wu, wd = (jax.lax.dynamic_index_in_dim(w[...], e, keepdims=False).astype(dt)
                              for w in (self.gate_proj, self.up_proj, self.down_proj))
                keep = None if keep_EG is None else keep_EG[e].astype(dt)

                def tiles(size, base):
                    def tile(j, carry):
                        y_buf, cnt_BG = carry
                        start = base + j * size
                        x_tD = jax.lax.dynamic_slice_in_dim(x_buf, start, size)
                        a_tG = act(x_tD @ wg)
                        if counting:
                            seq_t = jax.lax.dynamic_slice_in_dim(s_buf, start, size)
                            onehot_tB = (seq_t[:, None] == jnp.arange(B, dtype=jnp.int32)).astype(dt)
                            cnt_BG = cnt_BG + jnp.einsum("tB,tG->BG", onehot_tB, (a_tG > 0).astype(dt),
                                                         preferred_element_type=jnp.float32)
                        if with_y:
                            if keep is not None:
                                a_tG = a_tG * keep
                            y_tD = (a_tG * (x_tD @ wu)) @ wd
                            y_buf = jax.lax.dynamic_update_slice_in_dim(y_buf, y_tD, start, 0)
                        return y_buf, cnt_BG
                    return tile

                y_buf, cnt_EBG = carry
                n_full = group_sizes[e] // tb
                inner = (y_buf, jnp.zeros((B, G), jnp.float32))
                inner = jax.lax.fori_loop(0, n_full, tiles(tb, starts[e]), inner)
                n_tail = (padded[e] - n_full * tb) // ts
                y_buf, cnt_BG = jax.lax.fori_loop(0, n_tail, tiles(ts, starts[e] + n_full * tb), inner)
                return y_buf, jax.lax.dynamic_update_index_in_dim(cnt_EBG, cnt_BG, e, 0)

            def run():
                init = (jnp.zeros((n_rows, D), dt), jnp.zeros((E, B, G), jnp.float32))
                return jax.lax.fori_loop(0, E, expert, init)
            return run

        y_buf, cnt_EBG = loop(True)() if out_needed is None else jax.lax.cond(out_needed, loop(True), loop(False))
        counts = cnt_EBG.astype(jnp.int32).transpose(1, 0, 2) if counting else None
        return y_buf[pos], counts

    def __call__(self, x_BTD, count_mask_BT=None, ablate=None, out_needed=None, valid_BT=None):
        """Returns (out [B, T, D], stats dict or None).

        Args:
          x_BTD: FFN input (after the pre-norm).
          count_mask_BT: bool, tokens to count; None skips all counting.
          ablate: optional dict with "expert_drop" bool [E], "expert_neuron_keep"
            float [E, G], "neuron_keep" float [S] (shared expert).
        Stats (when counting): "expert_routed" int32 [B, E], "expert_neuron_active"
        int32 [B, E, G] and, with a shared expert, "neuron_active" int32 [B, S].
        `out_needed` (traced bool; None means True): False lets the expert loop skip
        the up and down products (counts-only last layer; other paths compute them).
        `valid_BT` (bool; None = every token real): the expert loop leaves padding
        tokens out (their output is 0; no real token ever attends to them).
        """
        ablate = ablate or {}
        dt = self.dtype
        B, T, D = x_BTD.shape
        E = self.router.shape[-1]
        k = self.top_k
        x_ND = x_BTD.reshape(B * T, D)
        logits_NE = x_ND @ self.router[...].astype(dt)
        w_Nk, e_Nk = route(logits_NE, k, self.norm_topk_prob, ablate.get("expert_drop"))

        impl = self.impl
        if impl == "auto":
            # Counting is inference: the faster, non-differentiable loop is fine there.
            backend = jax.default_backend()
            impl = (("looped" if count_mask_BT is not None else "tiled") if backend == "cpu"
                    else "capacity" if backend == "gpu" else "ragged")
        # Sort assignments by (expert, sequence): contiguous expert groups for ragged_dot,
        # and sorted segment ids (expert * B + sequence) for the counts. The expert loop
        # also moves padding tokens past every group (segment E * B), out of the work.
        e_M = e_Nk.reshape(-1)
        tok_M = jnp.repeat(jnp.arange(B * T, dtype=jnp.int32), k)
        seg_M = e_M * B + tok_M // T
        real_M = None if valid_BT is None or impl != "looped" else valid_BT.reshape(-1)[tok_M]
        if real_M is not None:
            seg_M = jnp.where(real_M, seg_M, E * B)
        order = jnp.argsort(seg_M, stable=True)
        e_sorted, tok_sorted, seg_sorted = e_M[order], tok_M[order], seg_M[order]
        group_sizes = jnp.bincount(e_M if real_M is None else jnp.where(real_M, e_M, E),
                                   length=E + 1)[:E].astype(jnp.int32)

        xs_MD = x_ND[tok_sorted]
        cm_M = None if count_mask_BT is None else count_mask_BT.reshape(-1)[tok_sorted]
        keep_EG = ablate.get("expert_neuron_keep")
        counts_BEG = None
        if impl == "capacity":
            y_MD, active_MG = self._experts_capacity(xs_MD, e_sorted, group_sizes, cm_M, keep_EG)
        elif impl == "looped":
            y_MD, counts_BEG = self._experts_looped(xs_MD, e_sorted, group_sizes, cm_M, keep_EG,
                                                    seg_sorted % B, B, out_needed,
                                                    None if real_M is None else real_M[order])
        elif impl == "ragged":
            y_MD, active_MG = self._experts_ragged(xs_MD, e_sorted, group_sizes, cm_M, keep_EG)
        else:
            y_MD, active_MG = self._experts_tiled(xs_MD, e_sorted, group_sizes, cm_M, keep_EG)
        # Back to (token, k) order, weight and sum over the k experts of each token.
        inv = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))
        stats = None
        if count_mask_BT is not None:
            routed = jax.nn.one_hot(e_Nk, E, dtype=jnp.int32).sum(1) * count_mask_BT.reshape(-1, 1)
            stats = {
                "expert_routed": routed.reshape(B, T, E).sum(1),
                "expert_neuron_active": (counts_BEG if counts_BEG is not None else
                                         expert_neuron_counts(active_MG, seg_sorted, inv, e_Nk, B, E)),
            }
        y_NkD = y_MD[inv].reshape(B * T, k, D)
        out_ND = jnp.einsum("NkD,Nk->ND", y_NkD.astype(jnp.float32), w_Nk).astype(dt)
        out_BTD = out_ND.reshape(B, T, D)

        if self.has_shared:
            sh, sh_counts = self.shared_expert(x_BTD, count_mask_BT, ablate.get("neuron_keep"), out_needed)
            g = jax.nn.sigmoid(jnp.einsum("BTD,DO->BTO", x_BTD, self.shared_expert_gate[...].astype(dt)))
            out_BTD = out_BTD + g * sh
            if stats is not None:
                stats["neuron_active"] = sh_counts
        return out_BTD, stats
