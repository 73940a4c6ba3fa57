"""Figures of the loop analyses (matplotlib, Agg backend): each function draws one PNG and returns its path.

Per-token figures show one row of the batch with the tokens' text on an axis; every figure has a title, axis
labels and, for heatmaps, a colour bar. Figures are at most :data:`WIDTH` inches wide at :data:`DPI`, the width
of the HTML report's column, so their text shows at its own size there; token labels are thinned and shortened
to the room they have, and an axis label says when only every k-th token is labelled.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from loopformer.analysis.path import NOISE_ULPS
from loopformer.errors import InputError

DPI = 100
WIDTH = 10.0
FONT = 9
MAX_LENS_ROWS = 32
MAX_LENS_COLS = 16


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise InputError("plots need matplotlib: pip install 'loopformer[plot]'.") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    _pyplot().close(fig)
    return path


def _short(text: str, chars: int) -> str:
    """``text`` cut to ``chars`` characters, the last one an ellipsis when cut."""
    return text if len(text) <= chars else text[: max(1, chars - 1)] + "\u2026"


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def _token_axis(ax, labels: Sequence[str], room: float, axis: str = "y") -> str:
    """Token text as tick labels, as many as fit in ``room`` inches; returns the axis-label note ("" if all)."""
    step = max(1, math.ceil(len(labels) * FONT * 1.5 / (room * 72)))
    ticks = list(range(0, len(labels), step))
    setter = ax.set_yticks if axis == "y" else ax.set_xticks
    setter(ticks, [_short(labels[i], 12) for i in ticks], fontsize=FONT, rotation=0 if axis == "y" else 90)
    return "" if step == 1 else f" (every {_ordinal(step)} labelled)"


def _iteration_axis(ax, loops: int) -> None:
    """Ticks 1, 1+k, ... on a heatmap's x axis of ``loops`` columns."""
    ticks = range(0, loops, max(1, loops // 8))
    ax.set_xticks(list(ticks), [str(i + 1) for i in ticks], fontsize=FONT)


def plot_convergence(distance: torch.Tensor, change: torch.Tensor, labels: Sequence[str], path: Path) -> Path:
    """Heatmaps (tokens x iterations, log colour) of the distance to s* and of the relative change, one row."""
    plt = _pyplot()
    from matplotlib.colors import LogNorm

    height = min(12.0, max(3.5, 0.2 * len(labels) + 1.8))
    fig, axes = plt.subplots(1, 2, figsize=(WIDTH, height))
    panels = ((distance, "||s_i - s*|| / ||s*||"), (change, "||s_i - s_(i-1)|| / ||s_i||"))
    for ax, (values, title) in zip(axes, panels, strict=True):
        data = values.float().clamp_min(1e-8).nan_to_num(nan=1e-8).numpy()
        image = ax.imshow(data, aspect="auto", norm=LogNorm(vmin=max(float(data.min()), 1e-8), vmax=float(data.max())))
        ax.set_title(title)
        ax.set_xlabel("iteration i")
        _iteration_axis(ax, data.shape[1])
        ax.set_ylabel("token" + _token_axis(ax, labels, height - 1.6))
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fig.suptitle("Convergence of the latent state per token")
    return _save(fig, path)


def plot_pca(
    coords: torch.Tensor, explained: torch.Tensor, labels: Sequence[str], tokens: Sequence[int], path: Path
) -> Path:
    """Trajectories of selected tokens on principal components (1,2), (3,4), (5,6); ``coords`` [R, T, k]."""
    plt = _pyplot()
    pairs = [(a, a + 1) for a in range(0, min(coords.shape[-1], 6) - 1, 2)]
    fig, axes = plt.subplots(1, len(pairs), figsize=(min(WIDTH, 4 * len(pairs)), 4), squeeze=False)
    for ax, (a, b) in zip(axes[0], pairs, strict=True):
        for n, token in enumerate(tokens):
            xs, ys = coords[:, token, a].numpy(), coords[:, token, b].numpy()
            colour = f"C{n % 10}"
            ax.plot(xs, ys, "-", color=colour, linewidth=1, alpha=0.8, label=f"{token}: {_short(labels[token], 12)}")
            ax.plot(xs[0], ys[0], "o", color=colour, markersize=4)
            ax.plot(xs[-1], ys[-1], "*", color=colour, markersize=9)
        ax.set_xlabel(f"PC{a + 1} ({float(explained[a]):.1%})")
        ax.set_ylabel(f"PC{b + 1} ({float(explained[b]):.1%})")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8, loc="best")
    fig.suptitle("Latent trajectories on principal components (o = first iteration, * = last)")
    return _save(fig, path)


def plot_path_independence(
    spread: torch.Tensor, noise_floor: float, dtype: str, labels: Sequence[str], path: Path
) -> Path:
    """Per-token spread of the final states reached from different random initial states, on a fixed log axis
    from ``noise_floor`` / 1000 to 1 (or the largest spread) with the noise floor drawn, so rounding differences
    stay small bars in the shaded noise band instead of filling the plot."""
    plt = _pyplot()
    values = spread.float().numpy()
    largest = float(values.max())
    bottom, top = noise_floor / 1000, max(1.0, 2 * largest)
    fig, ax = plt.subplots(figsize=(min(WIDTH, max(6.0, 0.2 * len(labels) + 2)), 4))
    ax.axhspan(bottom, noise_floor, color="0.9", zorder=0)
    floor = f"noise floor {noise_floor:.2g} ({NOISE_ULPS} x {dtype} eps)"
    ax.axhline(noise_floor, color="C3", linestyle="--", linewidth=1, label=floor)
    ax.bar(range(len(labels)), values.clip(min=bottom), color="C0", zorder=2)
    ax.set_yscale("log")
    ax.set_ylim(bottom, top)
    ax.set_xlabel("token" + _token_axis(ax, labels, fig.get_figwidth() - 1.2, axis="x"))
    ax.set_ylabel("spread ||a - b|| / ||a||")
    verdict = "identical within float noise" if largest <= noise_floor else "depends on the start"
    ax.set_title(f"Path independence: max spread {largest:.2g}, {verdict}")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8, loc="upper right")
    return _save(fig, path)


def lens_iterations(loops: int) -> list[int]:
    """The iterations (0-based) drawn in the logit lens: all up to :data:`MAX_LENS_ROWS`, else every k-th from
    the first, and the last."""
    step = 1 if loops <= MAX_LENS_ROWS else math.ceil((loops - 1) / (MAX_LENS_ROWS - 1))
    return sorted({*range(0, loops, step), loops - 1})


def describe_iterations(rows: Sequence[int], loops: int) -> str:
    """ "" when ``rows`` are all ``loops`` iterations, else which ones they are, e.g. "every 2nd iteration ..."."""
    if len(rows) == loops:
        return ""
    step = rows[1] - rows[0]
    shown = ", ".join(str(r + 1) for r in rows[:3])
    return f"every {_ordinal(step)} iteration ({shown}, ..., {rows[-1] + 1}; {len(rows)} of {loops} shown)"


def plot_logit_lens(
    top_ids: torch.Tensor, top_probs: torch.Tensor, decode: Callable[[int], str], labels: Sequence[str], path: Path
) -> Path:
    """Top-1 token of every intermediate state (rows: iterations, columns: positions), coloured by probability.

    ``top_ids`` / ``top_probs``: [R, T] for one row; the iterations of :func:`lens_iterations` and the last
    :data:`MAX_LENS_COLS` positions are shown, and the title says when either is a selection.
    """
    plt = _pyplot()
    loops, length = top_ids.shape
    rows = lens_iterations(loops)
    cols = list(range(max(0, length - MAX_LENS_COLS), length))
    probs = top_probs[rows][:, cols].float().numpy()
    height = 0.3 * len(rows) + 2.4
    fig, ax = plt.subplots(figsize=(min(WIDTH, max(6.0, 0.55 * len(cols) + 2.2)), height))
    cell_font = FONT - 1
    chars = max(3, int((fig.get_figwidth() - 2.2) / len(cols) * 72 / (0.7 * cell_font)))
    image = ax.imshow(probs, aspect="auto", cmap="Blues", vmin=0, vmax=1)
    for r, it in enumerate(rows):
        for c, pos in enumerate(cols):
            text = _short(decode(int(top_ids[it, pos])), chars)
            colour = "black" if probs[r, c] < 0.6 else "white"
            ax.text(c, r, text, ha="center", va="center", fontsize=cell_font, color=colour)
    ax.set_yticks(range(len(rows)), [str(it + 1) for it in rows], fontsize=FONT)
    ax.set_xticks(range(len(cols)), [_short(labels[p], 10) for p in cols], fontsize=FONT, rotation=90)
    ax.set_ylabel("iteration")
    note = f"last {len(cols)} of {length} input tokens" if len(cols) < length else "input token"
    ax.set_xlabel(f"{note} (the cell predicts the next one)")
    sampled = describe_iterations(rows, loops)
    ax.set_title("Logit lens: top-1 prediction of each intermediate state" + (f"\n{sampled}" if sampled else ""))
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="probability")
    return _save(fig, path)


def plot_exit_histograms(histograms: dict[str, dict[str, dict[int, int]]], loops: int, path: Path) -> Path:
    """One panel per exit rule; one step histogram per group (dataset or difficulty): ``{rule: {group: hist}}``."""
    plt = _pyplot()
    rules = list(histograms)
    columns = min(3, len(rules))
    rows = (len(rules) + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(min(WIDTH, 4 * columns), 3.2 * rows), squeeze=False)
    for ax, rule in zip(axes.flat, rules, strict=False):
        groups = histograms[rule]
        width = 0.8 / max(1, len(groups))
        for n, (group, hist) in enumerate(groups.items()):
            total = max(1, sum(hist.values()))
            steps = sorted(hist)
            ax.bar(
                [s + (n - (len(groups) - 1) / 2) * width for s in steps],
                [hist[s] / total for s in steps],
                width=width,
                label=str(group),
                color=f"C{n % 10}",
            )
        ax.set_title(rule, fontsize=9)
        ax.set_xlim(0, loops + 1)
        ax.set_xlabel("exit iteration")
        ax.set_ylabel("share of tokens")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(rules) :]:
        ax.axis("off")
    fig.suptitle("Zero-shot exit steps per criterion")
    return _save(fig, path)


def plot_curves(curves: Sequence, path: Path) -> Path:
    """Metric vs loops, one line per curve (checkpoint or dataset); log-2 loop axis."""
    plt = _pyplot()
    if not curves:
        raise InputError("no curves to plot.")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for n, curve in enumerate(curves):
        ax.plot(curve.loops, curve.values, "o-", color=f"C{n % 10}", label=curve.label)
    ax.set_xscale("log", base=2)
    ax.set_xticks(curves[0].loops, [str(r) for r in curves[0].loops])
    ax.set_xlabel("loops r")
    ax.set_ylabel(curves[0].metric)
    if curves[0].metric == "perplexity":
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"{curves[0].metric} vs loops")
    return _save(fig, path)
