"""Report figures, one function per figure; each returns a matplotlib Figure.

Figures are built with matplotlib's object API and the Agg canvas (no pyplot,
no global backend state), so they render headless and from several threads.
Inputs are plain arrays or summary.json sections; categories in CATEGORIES order.
"""

from __future__ import annotations

import io
import textwrap
from typing import Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.image import imsave
from matplotlib.ticker import MaxNLocator

from sparcom_jax.analysis.evaluate import category_order
from sparcom_jax.categories import CATEGORIES, SHORT_NAMES
from sparcom_jax.report.tables import SHORT, unmeasured


class NotebookFigure(Figure):
    """A matplotlib Figure that a Jupyter notebook shows inline as it is.

    IPython draws a plain Figure only once the inline backend has registered its formatter,
    which happens when pyplot is imported; these figures never touch pyplot, so without
    `_repr_png_` a cell ending in one printed "<Figure size ... with 4 Axes>". Where the
    backend's formatter is registered IPython uses it instead (one image either way).
    """

    def _repr_png_(self) -> bytes:
        return to_png(self)


def _fig(w: float, h: float) -> Figure:
    fig = NotebookFigure(figsize=(w, h), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _suptitle(fig: Figure, title: str, fontsize: float = 11) -> None:
    """The figure title, wrapped to the figure's width (a one-panel figure is narrow)."""
    # An average character is about 0.6 em wide; 72 points per inch.
    per_line = max(20, int(fig.get_figwidth() * 72 / (0.6 * fontsize)))
    fig.suptitle(textwrap.fill(title, per_line), fontsize=fontsize)


def to_png(fig: Figure, dpi: int = 100) -> bytes:
    """Render a figure to PNG bytes: those ``fig.savefig(buf, format="png", dpi=dpi)`` writes.

    savefig draws a figure that has a layout engine twice, once to lay it out (rendering
    off) and once to render it. One draw of the Agg canvas does both, since the engine runs
    at the start of every draw: the same bytes in about 60 % of the time (25 report figures).
    """
    buf = io.BytesIO()
    if not isinstance(fig.canvas, FigureCanvasAgg):  # not one of ours: let savefig pick the canvas
        fig.savefig(buf, format="png", dpi=dpi)
        return buf.getvalue()
    shown_at = fig.dpi
    try:
        fig.set_dpi(dpi)
        fig.canvas.draw()
        imsave(buf, fig.canvas.buffer_rgba(), format="png", origin="upper", dpi=dpi)
    finally:
        fig.set_dpi(shown_at)
    return buf.getvalue()


def _arr(x) -> np.ndarray:
    """Nested lists from JSON (None = undefined) -> float array with NaN."""
    return np.array(x, dtype=float)


def _heatmap(ax, m: np.ndarray, title: str, vmin=None, vmax=None, cmap="viridis", fmt="{:.2f}"):
    im = ax.imshow(np.ma.masked_invalid(m), vmin=vmin, vmax=vmax, cmap=cmap)
    ax.set_xticks(range(len(SHORT)), SHORT, rotation=45)
    ax.set_yticks(range(len(SHORT)), SHORT)
    ax.set_title(title, fontsize=10)
    if m.shape[0] <= 8:
        for i in range(m.shape[0]):
            for j in range(m.shape[1]):
                if np.isfinite(m[i, j]):
                    r, g, b, _ = im.cmap(im.norm(m[i, j]))
                    # Dark text on light cells and vice versa, whatever the colour map.
                    light = 0.299 * r + 0.587 * g + 0.114 * b > 0.5
                    ax.text(j, i, fmt.format(m[i, j]), ha="center", va="center", fontsize=7,
                            color="black" if light else "white")
    return im


def overlap_heatmaps(mats: Mapping[str, Sequence], title: str, *, label: str = "Jaccard") -> Figure:
    """6x6 overlap heatmaps side by side (one per model, shared colour scale).

    Args:
      mats: {model name: [C, C] matrix (lists may hold None)}.
      title: figure title.
      label: colour bar label.
    """
    arrs = {k: _arr(v) for k, v in mats.items()}
    vmax = max([np.nanmax(a) for a in arrs.values() if np.isfinite(a).any()] or [1.0])
    fig = _fig(3.6 * len(arrs) + 0.8, 3.6)
    axes = fig.subplots(1, len(arrs), squeeze=False)[0]
    im = None
    for ax, (name, a) in zip(axes, arrs.items()):
        im = _heatmap(ax, a, name, vmin=0, vmax=vmax)
    fig.colorbar(im, ax=list(axes), label=label, shrink=0.8)
    _suptitle(fig, title)
    return fig


def instruction_heatmap(matrix: np.ndarray, labels: np.ndarray, title: str) -> Figure:
    """Instruction x instruction Jaccard, ordered by category, blocks outlined.

    Args:
      matrix: float [N, N] in the instructions' original order.
      labels: int [N] category indices.
      title: figure title.
    """
    order, bounds = category_order(labels)
    m = np.asarray(matrix, dtype=float)[np.ix_(order, order)]
    off = ~np.eye(m.shape[0], dtype=bool)
    # Scale to the off-diagonal range: the diagonal's 1s would wash the blocks out.
    vmax = np.nanmax(m[off]) if off.any() and np.isfinite(m[off]).any() else 1.0
    fig = _fig(6.0, 5.2)
    ax = fig.add_subplot()
    im = ax.imshow(np.ma.masked_invalid(m), vmin=0, vmax=vmax, cmap="magma", interpolation="nearest")
    for b in bounds[1:-1]:
        ax.axhline(b - 0.5, color="white", lw=0.8)
        ax.axvline(b - 0.5, color="white", lw=0.8)
    centres = [(bounds[i] + bounds[i + 1] - 1) / 2 for i in range(len(CATEGORIES))]
    keep = [i for i in range(len(CATEGORIES)) if bounds[i + 1] > bounds[i]]
    ax.set_xticks([centres[i] for i in keep], [SHORT[i] for i in keep], rotation=45)
    ax.set_yticks([centres[i] for i in keep], [SHORT[i] for i in keep])
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, label="Jaccard of S(I), S(I')")
    return fig


def layer_distribution(
    per_layer: Mapping[str, Mapping[str, Sequence[float]]], title: str, *,
    phases: Mapping[str, Mapping[str, dict]] | None = None, ylabel: str = "units in S(c)",
) -> Figure:
    """|S(c)| per layer, one panel per category, one line per model.

    Args:
      per_layer: {model: {category: [L]}}.
      title: figure title.
      phases: optional {model: {category: locate_phases dict}}; boundaries are
        drawn as dashed lines in the model's colour.
      ylabel: y axis label.
    """
    fig = _fig(11, 6)
    axes = fig.subplots(2, 3, sharex=True).ravel()
    for k, (name, prof) in enumerate(per_layer.items()):
        colour = f"C{k}"
        for ax, cat in zip(axes, CATEGORIES):
            y = _arr(prof[cat])
            ax.plot(np.arange(y.shape[0]), y, color=colour, label=name, marker=".", ms=3)
            ph = (phases or {}).get(name, {}).get(cat)
            for b in (ph or {}).get("boundaries") or []:
                ax.axvline(b - 0.5, color=colour, ls="--", lw=0.8)
    for ax, cat in zip(axes, CATEGORIES):
        ax.set_title(cat, fontsize=10)
        ax.set_xlabel("layer")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(ylabel)
    axes[0].legend(fontsize=8)
    _suptitle(fig, title)
    return fig


def generality_uniqueness(sections: Mapping[str, dict], title: str, *, units: str = "units") -> Figure:
    """Set sizes with their unique part, unique ratios and breadth histograms.

    Args:
      sections: {model: summary section (models.<name>.<section>)}.
      title: figure title.
      units: what the sets hold ("neurons", "experts", ...), for the axis labels.
    """
    fig = _fig(13, 4)
    ax_size, ax_ratio, ax_breadth = fig.subplots(1, 3)
    n = len(sections)
    width = 0.8 / max(n, 1)
    x = np.arange(len(CATEGORIES))
    for k, (name, s) in enumerate(sections.items()):
        pos = x - 0.4 + width * (k + 0.5)
        size = _arr([s["per_category_count"][c] for c in CATEGORIES])
        uniq = _arr([s["unique"][c] for c in CATEGORIES])
        ax_size.bar(pos, size, width, color=f"C{k}", alpha=0.45, label=f"{name} |S(c)|")
        ax_size.bar(pos, uniq, width, color=f"C{k}", label=f"{name} |U(c)|")
        ax_ratio.bar(pos, _arr([s["unique_ratio"][c] for c in CATEGORIES]), width, color=f"C{k}", label=name)
        hist = s["breadth_histogram"]
        ks = sorted(hist, key=int)
        share = "n/a" if s["general_share"] is None else f"{s['general_share']:.1%}"
        ax_breadth.bar(np.arange(len(ks)) - 0.4 + width * (k + 0.5), [hist[b] for b in ks], width,
                       color=f"C{k}", label=f"{name}: general {'-' if s['general'] is None else s['general']} ({share} of union)")
        ax_breadth.set_xticks(range(len(ks)), ks)
    for ax in (ax_size, ax_ratio):
        ax.set_xticks(x, SHORT)
    ax_size.set_title("set size (light) and unique part (dark)", fontsize=10)
    ax_ratio.set_title("uniqueness |U(c)| / |S(c)|", fontsize=10)
    ax_breadth.set_title("breadth: in how many categories", fontsize=10)
    ax_breadth.set_xlabel("categories")
    ax_size.set_ylabel(units)
    ax_ratio.set_ylabel("share of the category's set")
    ax_breadth.set_ylabel(f"{units} in the union")
    for ax in (ax_size, ax_ratio, ax_breadth):
        # Below the panel, never over the bars.
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=2)
    _suptitle(fig, title)
    return fig


def comparison_bars(section: Mapping[str, dict], title: str, before: str, after: str) -> Figure:
    """Retained / lost / gained units per category, with Jaccard(before, after).

    Args:
      section: comparison.<section> ({category: {retained, gained, lost, jaccard, ...}}).
      title: figure title.
      before, after: model names.
    """
    fig = _fig(8, 4)
    ax = fig.add_subplot()
    x = np.arange(len(CATEGORIES))
    ret = _arr([section[c]["retained"] for c in CATEGORIES])
    lost = _arr([section[c]["lost"] for c in CATEGORIES])
    gain = _arr([section[c]["gained"] for c in CATEGORIES])
    ax.bar(x - 0.2, ret, 0.4, color="C0", label="retained")
    ax.bar(x - 0.2, lost, 0.4, bottom=ret, color="C3", label=f"lost (in {before} only)")
    ax.bar(x + 0.2, ret, 0.4, color="C0")
    ax.bar(x + 0.2, gain, 0.4, bottom=ret, color="C2", label=f"gained (in {after} only)")
    for i, c in enumerate(CATEGORIES):
        j = section[c]["jaccard"]
        top = np.nansum([ret[i], max(lost[i], gain[i])])
        # A category without instructions has 0 units on either side (no bars): nothing was measured.
        label = "no\nrecords" if section[c].get("n_instructions") == 0 else "J=n/a" if j is None else f"J={j:.2f}"
        ax.text(i, top, label, ha="center", va="bottom", fontsize=8)
    ax.set_xticks(x, SHORT)
    ax.set_ylabel("units (left bar: before, right bar: after)")
    ax.set_ylim(top=ax.get_ylim()[1] * 1.08)  # room for the J= labels
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the bars, never over them
    ax.set_title(title, fontsize=11)
    return fig


def ablation_matrices(isn, random, title: str) -> Figure:
    """Loss increase when ablating each category's set, vs random sets, and their difference.

    Args:
      isn: [C, C] loss increase, rows ablated category, columns evaluated category.
      random: [C, C] the same for random sets with equal per-layer counts.
      title: figure title.
    """
    a, r = _arr(isn), _arr(random)
    d = a - r
    fig = _fig(12, 4)
    axes = fig.subplots(1, 3)
    vmax = np.nanmax(np.abs(np.concatenate([a.ravel(), r.ravel()]))) if np.isfinite(a).any() else 1.0
    vmax = vmax or 1.0
    for ax, m, t in ((axes[0], a, "instruction-specific set"), (axes[1], r, "random sets (mean)")):
        im = _heatmap(ax, m, t, vmin=-vmax, vmax=vmax, cmap="RdBu_r", fmt="{:.3f}")
    fig.colorbar(im, ax=list(axes[:2]), label="loss increase (nats per token)", shrink=0.8)
    dmax = np.nanmax(np.abs(d)) if np.isfinite(d).any() else 1.0
    im = _heatmap(axes[2], d, "specific minus random", vmin=-(dmax or 1), vmax=dmax or 1,
                  cmap="RdBu_r", fmt="{:.3f}")
    fig.colorbar(im, ax=axes[2], label="specific minus random (nats per token)", shrink=0.8)
    for ax in axes:
        ax.set_xlabel("evaluated category")
        ax.set_ylabel("ablated category")
    _suptitle(fig, title)
    return fig


def expert_heatmaps(per_category: Mapping[str, Sequence], title: str, *, label: str) -> Figure:
    """A [L, E] heatmap per category (routing frequency or unit counts).

    Args:
      per_category: {category: [L][E]}.
      title: figure title.
      label: colour bar label.
    """
    arrs = {c: _arr(per_category[c]) for c in CATEGORIES}
    vmax = max(np.nanmax(a) for a in arrs.values()) or 1.0
    fig = _fig(12, 6.5)
    axes = fig.subplots(2, 3).ravel()
    im = None
    for ax, c in zip(axes, CATEGORIES):
        im = ax.imshow(arrs[c], vmin=0, vmax=vmax, aspect="auto", cmap="viridis", interpolation="nearest")
        ax.set_title(c, fontsize=10)
        ax.set_xlabel("expert")
        ax.set_ylabel("layer")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    fig.colorbar(im, ax=list(axes), label=label, shrink=0.8)
    _suptitle(fig, title)
    return fig


def series_trends(names: Sequence[str], trends: dict, title: str) -> Figure:
    """The comparison figures along a checkpoint series.

    Categories without instructions (n_instructions 0) are not drawn: their 0 sizes
    measure nothing; the legend names them.

    Args:
      names: checkpoint names, in order.
      trends: series.<section> from compare_series.
      title: figure title.
    """
    fig = _fig(13, 7)
    axes = fig.subplots(2, 3).ravel()
    x = np.arange(len(names))
    absent = unmeasured(trends)  # no instructions: their 0s are not measurements, so no line is drawn
    panels = [
        ("per_category_count", "|S(c)|"),
        ("unique_ratio", "|U(c)| / |S(c)|"),
        (("vs_base", "jaccard"), "Jaccard vs first"),
        (("vs_previous", "jaccard"), "Jaccard vs previous"),
    ]
    for ax, (key, lab) in zip(axes, panels):
        d = trends[key[0]][key[1]] if isinstance(key, tuple) else trends[key]
        for k, c in enumerate(CATEGORIES):
            if c not in absent:
                ax.plot(x, _arr(d[c]), marker=".", color=f"C{k}", label=SHORT_NAMES[c])
        ax.set_title(lab, fontsize=10)
    per = (trends.get("bootstrap") or {}).get("per_checkpoint") or {}
    for ax, key, title, color in ((axes[4], "general_share", "generality: general share of the union", "C0"),
                                  (axes[5], "diagonal_dominance", "instruction-level diagonal dominance", "k")):
        ax.plot(x, _arr(trends[key]), marker=".", color=color)
        if key in per:  # the paired interval at each checkpoint
            ax.fill_between(x, _arr(per[key]["low"]), _arr(per[key]["high"]), color=color, alpha=0.15, lw=0)
        ax.set_title(title, fontsize=10)
    for ax in axes:
        ax.set_xticks(x, names, rotation=30, fontsize=7)
    axes[0].legend(fontsize=7, title_fontsize=7, title=(
        f"not drawn, no instructions:\n{', '.join(SHORT_NAMES[c] for c in absent)}" if absent else None))
    _suptitle(fig, title)
    return fig


def size_vs_length(pairs: Mapping[str, dict], title: str) -> Figure:
    """|S(I)| against prompt length T(I), one panel per model, points coloured by category.

    With ties broken (exactly k units per instruction), the sizes the same rule gives
    with ties kept are drawn too (grey rings): the dependence on length the break removes.

    Args:
      pairs: {model: set_size_vs_length entry with per-instruction `tokens`,
        `set_size` and `category` lists and the overall `spearman`, and optionally
        `ties_kept` with its own `set_size` and `spearman`}.
      title: figure title.
    """
    fig = _fig(4.2 * len(pairs) + 0.6, 3.8)
    axes = fig.subplots(1, len(pairs), squeeze=False)[0]
    for ax, (name, v) in zip(axes, pairs.items()):
        t, z = _arr(v["tokens"]), _arr(v["set_size"])
        kept = v.get("ties_kept") or {}
        if kept.get("set_size") is not None:
            ax.scatter(t, _arr(kept["set_size"]), s=14, facecolors="none", edgecolors="0.6", linewidths=0.7,
                       label="ties kept")
        cats = list(v["category"])
        for k, c in enumerate(CATEGORIES):
            m = np.array([x == c for x in cats], dtype=bool)
            if m.any():
                ax.scatter(t[m], z[m], s=10, color=f"C{k}", alpha=0.7, label=SHORT_NAMES[c])
        rho = v.get("spearman")
        rho_kept = kept.get("spearman")
        ax.set_title(f"{name} (Spearman {'n/a' if rho is None else f'{rho:.2f}'}"
                     + (f"; ties kept {rho_kept:.2f}" if rho_kept is not None else "") + ")", fontsize=10)
        ax.set_xlabel("counted tokens T(I)")
        ax.set_ylabel("|S(I)| (units)")
    handles: dict = {}  # one legend for all panels, beside them, never over the points
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    fig.legend(list(handles.values()), list(handles), fontsize=7, loc="outside right upper")
    _suptitle(fig, title)
    return fig
