"""What a reader of the report sees: every headline with its interval and denominator, captions
true in edge cases (empty sets), no empty figure, legends and titles that hide nothing."""

import numpy as np

from sparcom_jax.categories import CATEGORIES
from sparcom_jax.report import figures as F


def drawn(fig):
    fig.canvas.draw()
    return fig.canvas.get_renderer()


def test_a_one_panel_figure_keeps_its_whole_title():
    fig = F.overlap_heatmaps({"base": np.eye(6).tolist()},
                             "Instruction-specific expert neurons (MoE): instruction-level overlap")
    r = drawn(fig)
    box = fig._suptitle.get_window_extent(r)
    assert box.x0 >= 0 and box.x1 <= fig.bbox.width


def test_legends_cover_no_bar_and_no_point():
    # Bars of equal height and a cloud of points that fill their panels: any legend inside covers data.
    sec = {"per_category_count": dict.fromkeys(CATEGORIES, 10), "unique": dict.fromkeys(CATEGORIES, 9),
           "unique_ratio": dict.fromkeys(CATEGORIES, 0.9), "breadth_histogram": {str(k): 10 for k in range(1, 7)},
           "general": 10, "general_share": 0.2}
    fig = F.generality_uniqueness({"base": sec, "tuned": sec}, "generality", units="neurons")
    r = drawn(fig)
    for ax in fig.axes:
        leg = ax.get_legend().get_window_extent(r)
        bars = [p.get_window_extent(r) for p in ax.patches if p.get_height() > 0]
        assert bars and not any(leg.overlaps(b) for b in bars), ax.get_title()
    n = 6 * 40
    rng = np.random.default_rng(0)
    v = {"tokens": rng.integers(1, 60, n).tolist(), "set_size": rng.integers(1, 60, n).tolist(),
         "category": [CATEGORIES[i % 6] for i in range(n)], "spearman": 0.0,
         "ties_kept": {"set_size": rng.integers(1, 60, n).tolist(), "spearman": 0.0}}
    fig = F.size_vs_length({"base": v}, "size vs length")
    r = drawn(fig)
    leg = fig.legends[0].get_window_extent(r)
    ax = fig.axes[0]
    pts = np.concatenate([ax.transData.transform(c.get_offsets()) for c in ax.collections])
    inside = (pts[:, 0] >= leg.x0) & (pts[:, 0] <= leg.x1) & (pts[:, 1] >= leg.y0) & (pts[:, 1] <= leg.y1)
    assert len(pts) == 2 * n and not inside.any()


def test_ablation_colour_bars_state_their_unit():
    m = np.full((6, 6), 0.1).tolist()
    fig = F.ablation_matrices(m, m, "ablation")
    labels = [ax.get_ylabel() for ax in fig.axes[3:]]  # the two colour bars
    assert labels == ["loss increase (nats per token)", "specific minus random (nats per token)"]
