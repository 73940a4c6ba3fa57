"""Figures of the loop analyses (matplotlib, Agg backend): each function draws one PNG and returns its path.

Per-token figures show one row of the batch with the tokens' text on an axis; every figure has a title, axis
labels and, for heatmaps, a colour bar.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from loopformer.errors import InputError


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
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path


def _token_axis(ax, labels: Sequence[str], axis: str = "y") -> None:
    """Token text as tick labels, thinned to at most 48 ticks."""
    step = max(1, len(labels) // 48)
    ticks = list(range(0, len(labels), step))
    setter = ax.set_yticks if axis == "y" else ax.set_xticks
    setter(ticks, [labels[i] for i in ticks], fontsize=7, rotation=0 if axis == "y" else 90)


def plot_convergence(distance: torch.Tensor, change: torch.Tensor, labels: Sequence[str], path: Path) -> Path:
    """Heatmaps (tokens x iterations, log colour) of the distance to s* and of the relative change, one row."""
    plt = _pyplot()
    from matplotlib.colors import LogNorm

    fig, axes = plt.subplots(1, 2, figsize=(13, max(3.5, 0.18 * len(labels) + 1.5)))
    panels = ((distance, "||s_i - s*|| / ||s*||"), (change, "||s_i - s_(i-1)|| / ||s_i||"))
    for ax, (values, title) in zip(axes, panels, strict=True):
        data = values.float().clamp_min(1e-8).nan_to_num(nan=1e-8).numpy()
        image = ax.imshow(data, aspect="auto", norm=LogNorm(vmin=max(float(data.min()), 1e-8), vmax=float(data.max())))
        ax.set_title(title)
        ax.set_xlabel("iteration i")
        ax.set_ylabel("token")
        ax.set_xticks(range(0, data.shape[1], max(1, data.shape[1] // 8)))
        ax.set_xticklabels([str(i + 1) for i in range(0, data.shape[1], max(1, data.shape[1] // 8))])
        _token_axis(ax, labels)
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fig.suptitle("Convergence of the latent state per token")
    return _save(fig, path)


def plot_pca(
    coords: torch.Tensor, explained: torch.Tensor, labels: Sequence[str], tokens: Sequence[int], path: Path
) -> Path:
    """Trajectories of selected tokens on principal components (1,2), (3,4), (5,6); ``coords`` [R, T, k]."""
    plt = _pyplot()
    pairs = [(a, a + 1) for a in range(0, min(coords.shape[-1], 6) - 1, 2)]
    fig, axes = plt.subplots(1, len(pairs), figsize=(5 * len(pairs), 4.5), squeeze=False)
    for ax, (a, b) in zip(axes[0], pairs, strict=True):
        for n, token in enumerate(tokens):
            xs, ys = coords[:, token, a].numpy(), coords[:, token, b].numpy()
            colour = f"C{n % 10}"
            ax.plot(xs, ys, "-", color=colour, linewidth=1, alpha=0.8, label=f"{token}: {labels[token]}")
            ax.plot(xs[0], ys[0], "o", color=colour, markersize=4)
            ax.plot(xs[-1], ys[-1], "*", color=colour, markersize=9)
        ax.set_xlabel(f"PC{a + 1} ({float(explained[a]):.1%})")
        ax.set_ylabel(f"PC{b + 1} ({float(explained[b]):.1%})")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7, loc="best")
    fig.suptitle("Latent trajectories on principal components (o = first iteration, * = last)")
    return _save(fig, path)


def plot_path_independence(spread: torch.Tensor, overall: float, labels: Sequence[str], path: Path) -> Path:
    """Per-token spread of the final states reached from different random initial states (log scale)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6, 0.2 * len(labels) + 2), 3.8))
    ax.bar(range(len(labels)), spread.float().clamp_min(1e-9).numpy(), color="C0")
    ax.set_yscale("log")
    _token_axis(ax, labels, axis="x")
    ax.set_ylabel("mean pairwise ||a - b|| / mean ||a||")
    ax.set_title(f"Path independence: spread of the final states across starts (mean cosine {overall:.4f})")
    ax.grid(alpha=0.3, axis="y")
    return _save(fig, path)


def plot_logit_lens(
    top_ids: torch.Tensor, top_probs: torch.Tensor, decode: callable, labels: Sequence[str], path: Path
) -> Path:
    """Top-1 token of every intermediate state (rows: iterations, columns: positions), coloured by probability.

    ``top_ids`` / ``top_probs``: [R, T] for one row; at most 24 iterations (the first 12, then evenly spaced to the
    last) and the last 32 positions are shown.
    """
    plt = _pyplot()
    loops, length = top_ids.shape
    rows = sorted({*range(min(loops, 12)), *(round(12 + i * (loops - 13) / 11) for i in range(12) if loops > 12)})
    cols = list(range(max(0, length - 32), length))
    probs = top_probs[rows][:, cols].float().numpy()
    fig, ax = plt.subplots(figsize=(max(6, 0.55 * len(cols) + 2), max(3, 0.32 * len(rows) + 1.5)))
    image = ax.imshow(probs, aspect="auto", cmap="Blues", vmin=0, vmax=1)
    for r, it in enumerate(rows):
        for c, pos in enumerate(cols):
            text = decode(int(top_ids[it, pos]))
            ax.text(
                c, r, text[:6], ha="center", va="center", fontsize=6, color="black" if probs[r, c] < 0.6 else "white"
            )
    ax.set_yticks(range(len(rows)), [str(it + 1) for it in rows], fontsize=7)
    ax.set_xticks(range(len(cols)), [labels[p] for p in cols], fontsize=7, rotation=90)
    ax.set_ylabel("iteration")
    ax.set_xlabel("input token (the cell predicts the next one)")
    ax.set_title("Logit lens: top-1 prediction of each intermediate state")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="probability")
    return _save(fig, path)


def plot_exit_histograms(histograms: dict[str, dict[str, dict[int, int]]], loops: int, path: Path) -> Path:
    """One panel per exit rule; one step histogram per group (dataset or difficulty): ``{rule: {group: hist}}``."""
    plt = _pyplot()
    rules = list(histograms)
    columns = min(3, len(rules))
    rows = (len(rules) + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(4.5 * columns, 3.2 * rows), squeeze=False)
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
