"""Figures for evaluation results and attention measures (docs/methods.md, section Attention measures), drawn
with matplotlib's Agg backend so they render without a display. Every function writes one PNG and returns its path.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: no display on servers / CI
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from .evaluate import METRICS, EvalResults  # noqa: E402
from .measures import AttentionMeasures  # noqa: E402
from .stats import mean_sd  # noqa: E402

METRIC_LABELS = {"exact_match": "exact match", "f1": "token F1", "lenient": "lenient match (gold in prediction)",
                 "best_subspan_em": "best-subspan exact match"}


def _save(fig: plt.Figure, path: str | Path) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(p, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return p


def _style(k: int) -> tuple[Any, str]:
    """A distinct colour and marker for line ``k``: the demo draws up to ~13 lines, more than matplotlib's default
    cycle of 10 colours, so colours come from tab20 and markers cycle too."""
    return plt.get_cmap("tab20")(k % 20), "osD^v<>ph*"[k % 10]


def _legend_outside(ax: Any) -> None:
    """Legend to the right of the axes, so that it never hides a line."""
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)


def accuracy_by_noise(results: Sequence[EvalResults], metric: str = "exact_match"
                      ) -> dict[str, dict[float, list[float]]]:
    """label -> noise ratio -> one value per seed (the data of :func:`plot_accuracy`)."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")
    table: dict[str, dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in results:
        for q in r.qa:
            if q.noise_ratio is not None:
                table[r.label][q.noise_ratio].append(getattr(q, metric))
    return {k: dict(v) for k, v in table.items()}


@dataclass
class AccuracyLine:
    """One line of :func:`plot_accuracy`, exactly as drawn: the value and the error bar's ends at each ratio.

    ``error``: ``"wilson"`` (one seed: the 95% Wilson score interval of ``value`` over ``n`` examples; exact for the
    0/1 metrics, an approximation for token F1) or ``"std"`` (several seeds: mean +- one sample standard deviation).
    """

    label: str
    ratios: list[float]
    values: list[float]
    lower: list[float]
    upper: list[float]
    n: list[int]  # examples per point (summed over seeds)
    seeds: int
    error: str
    reference: bool = False

    @property
    def legend(self) -> str:
        ns = sorted(set(self.n))
        n = f"n={ns[0]}" if len(ns) == 1 else f"n={ns[0]}-{ns[-1]}"
        return (f"{self.label} (base)" if self.reference else self.label) + f", {n}" + (
            f", {self.seeds} seeds" if self.seeds > 1 else "")


def accuracy_lines(results: Sequence[EvalResults], metric: str = "exact_match", *,
                   reference: str | None = None) -> list[AccuracyLine]:
    """What :func:`plot_accuracy` draws, line by line, in first-seen label order (so tests can check the plot's
    numbers, not only that a PNG exists). ``reference`` names the base model's label, drawn as the reference line."""
    from .robustness import wilson_interval

    table = accuracy_by_noise(results, metric)
    counts: dict[str, dict[float, int]] = defaultdict(lambda: defaultdict(int))
    seeds: dict[str, set[int]] = defaultdict(set)
    for r in results:
        for q in r.qa:
            if q.noise_ratio is not None:
                counts[r.label][q.noise_ratio] += q.n
                seeds[r.label].add(r.seed)
    lines = []
    for label, by_ratio in table.items():
        ratios = sorted(by_ratio)
        several = any(len(by_ratio[x]) > 1 for x in ratios)
        values, lower, upper = [], [], []
        for x in ratios:
            if several:
                mean, sd = mean_sd(by_ratio[x])
                lo, hi = mean - sd, mean + sd
            else:
                mean = by_ratio[x][0]
                lo, hi = wilson_interval(mean * counts[label][x], counts[label][x])
            values.append(mean)
            lower.append(lo)
            upper.append(hi)
        lines.append(AccuracyLine(label, ratios, values, lower, upper, [counts[label][x] for x in ratios],
                                  len(seeds[label]), "std" if several else "wilson", label == reference))
    return lines


def plot_accuracy(results: Sequence[EvalResults], path: str | Path, *, metric: str = "exact_match",
                  title: str | None = None, reference: str | None = None) -> Path:
    """Accuracy vs noise ratio, one line per model/method (``EvalResults.label``) with error bars: the 95% Wilson
    interval of each point for one seed, one sample standard deviation over seeds when several results share a label.
    ``reference`` (the base model's label) is drawn as a dashed black reference line with its interval shaded, so
    every other line reads as better or worse than the base. The legend gives n per point (:func:`accuracy_lines`)."""
    lines = accuracy_lines(results, metric, reference=reference)
    if not lines:
        raise ValueError("no noisy-QA results at explicit noise ratios to plot")
    if reference is not None and not any(line.reference for line in lines):
        raise ValueError(f"reference {reference!r} is not one of the labels: {', '.join(x.label for x in lines)}")
    fig, ax = plt.subplots(figsize=(8, 4.5))
    k = 0
    for line in lines:
        below = [v - lo for v, lo in zip(line.values, line.lower, strict=True)]
        above = [hi - v for v, hi in zip(line.values, line.upper, strict=True)]
        if line.reference:
            ax.plot(line.ratios, line.values, color="black", linestyle="--", marker="s", label=line.legend, zorder=3)
            ax.fill_between(line.ratios, line.lower, line.upper, color="grey", alpha=0.2, linewidth=0)
            continue
        color, marker = _style(k)
        k += 1
        ax.errorbar(line.ratios, line.values, yerr=[below, above], marker=marker, color=color, capsize=3,
                    label=line.legend)
    bars = {line.error for line in lines}
    ax.set_xlabel("noise ratio (share of distractor documents)")
    ax.set_ylabel(METRIC_LABELS[metric])
    ax.set_ylim(-0.02, 1.02)
    what = " / ".join(("95% Wilson interval" if b == "wilson" else "+-1 sd over seeds") for b in sorted(bars))
    ax.set_title(f"{title or f'Noisy-context QA: {METRIC_LABELS[metric]}'}\n(error bars: {what})", fontsize=10)
    ax.grid(alpha=0.3)
    _legend_outside(ax)
    return _save(fig, path)


@dataclass
class ProtocolBar:
    """One bar of :func:`plot_protocol_bars`, exactly as drawn: a row's mean over seeds at one group (noise ratio),
    its error bar (one sample standard deviation over seeds; 0 for one seed) and the panel it is drawn in."""

    panel: str
    label: str
    group: float
    mean: float
    sd: float
    seeds: int
    reference: bool = False
    baseline: bool = False


def protocol_bars(results: Sequence[EvalResults], panels: Mapping[str, Sequence[str]], *,
                  metric: str = "exact_match", reference: str | None = None, baselines: Sequence[str] = (),
                  groups: Sequence[float] | None = None) -> list[ProtocolBar]:
    """What :func:`plot_protocol_bars` draws, panel by panel, group by group, bar by bar: in each panel the
    ``reference`` (the untrained base) first, then the panel's rows in the given order. ``groups`` (default: every
    noise ratio measured) picks and orders the groups; a row without results at a group gets no bar there."""
    table = accuracy_by_noise(results, metric)
    if groups is None:
        groups = sorted({x for by in table.values() for x in by})
    bars = []
    for panel, rows in panels.items():
        shown = ([reference] if reference is not None else []) + [r for r in rows if r != reference]
        for g in groups:
            for label in shown:
                vals = next((v for x, v in table.get(label, {}).items() if math.isclose(x, g)), None)
                if not vals:
                    continue
                mean, sd = mean_sd(vals)
                bars.append(ProtocolBar(panel, label, float(g), mean, sd, len(vals), label == reference,
                                        label in baselines))
    return bars


def plot_protocol_bars(results: Sequence[EvalResults], panels: Mapping[str, Sequence[str]], path: str | Path, *,
                       metric: str = "exact_match", reference: str | None = None, baselines: Sequence[str] = (),
                       groups: Sequence[float] | None = None, group_label: Any = None,
                       colour_key: Mapping[str, str] | None = None, xlabel: str = "noise ratio",
                       title: str | None = None) -> Path:
    """Grouped bars, one panel per protocol (``panels``: title -> row labels), one group per noise ratio, one bar
    per row with one sample standard deviation over seeds as its error bar (:func:`protocol_bars` gives the numbers).

    The ``reference`` (the untrained base) is the first bar of every group, hatched with a dashed outline, so each
    row reads as above or below it; ``baselines`` are grey (outlined in their ``colour_key`` colour, so a matched
    baseline shows which method it matches); other rows take one colour per ``colour_key`` value (default: the
    label), the same in every panel. ``group_label(ratio)`` writes a group's tick label (e.g. with the number of
    distractors)."""
    bars = protocol_bars(results, panels, metric=metric, reference=reference, baselines=baselines, groups=groups)
    if not bars:
        raise ValueError("no noisy-QA results at explicit noise ratios to plot")
    keys = colour_key or {}
    palette: dict[str, Any] = {}
    for panel_rows in panels.values():
        for label in panel_rows:
            key = keys.get(label, label)
            if label not in baselines and label != reference and key not in palette:
                palette[key] = _style(len(palette))[0]
    names = [p for p in panels if any(b.panel == p for b in bars)]
    per_panel = {p: [b for b in bars if b.panel == p] for p in names}
    # Panel widths follow their bar counts, with a floor so that a 2-row panel still has room for its ticks and legend.
    widths = [max(3, len({b.label for b in per_panel[p]})) * max(1, len({b.group for b in per_panel[p]}))
              for p in names]
    # Side by side while that stays readable (the default demo: ~60 bars); stacked, legends to the right, beyond.
    stacked = sum(widths) > 100
    if stacked:
        fig, grid = plt.subplots(len(names), 1, figsize=(3.5 + 0.17 * max(widths), 3.4 * len(names)),
                                 squeeze=False, sharey=True)
        axes = [a[0] for a in grid]
    else:
        fig, grid = plt.subplots(1, len(names), figsize=(1.5 + 0.17 * sum(widths) + 0.4 * len(names), 5.0),
                                 squeeze=False, sharey=True, gridspec_kw={"width_ratios": widths})
        axes = list(grid[0])
    most = max(len({b.label for b in per_panel[p]}) for p in names)
    for ax, panel, units in zip(axes, names, widths, strict=True):
        mine = per_panel[panel]
        labels = list(dict.fromkeys(b.label for b in mine))
        xs = sorted({b.group for b in mine})
        width = 0.84 / (most if stacked else len(labels))  # stacked panels share one x scale: equal bar widths
        for j, label in enumerate(labels):
            rows = [b for b in mine if b.label == label]
            pos = [xs.index(b.group) + (j - (len(labels) - 1) / 2) * width for b in rows]
            key = keys.get(label, label)
            if label == reference:
                style: dict[str, Any] = {"color": "white", "edgecolor": "black", "hatch": "///", "linestyle": "--",
                                         "linewidth": 1.0}
            elif label in baselines:
                style = {"color": "0.55", "edgecolor": palette.get(key, "black"), "linewidth": 1.5}
            else:
                style = {"color": palette[key], "edgecolor": "black", "linewidth": 0.4}
            ax.bar(pos, [b.mean for b in rows], width, yerr=[b.sd for b in rows], capsize=1.5,
                   error_kw={"elinewidth": 0.8}, label=label + (" (reference)" if label == reference else ""),
                   **style)
        ax.set_xticks(range(len(xs)), [group_label(x) if group_label else f"{x:g}" for x in xs], fontsize=8)
        ax.set_title(panel, fontsize=9)
        if not stacked or ax is axes[-1]:
            ax.set_xlabel(xlabel, fontsize=8)
        ax.set_ylim(0, 1.05)
        ax.grid(axis="y", alpha=0.3)
        if stacked:
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), ncol=1 + len(labels) // 12,
                      frameon=False)
            ax.set_ylabel(METRIC_LABELS[metric])
        else:
            ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=max(1, min(4, units // 8)),
                      frameon=False)
    axes[0].set_ylabel(METRIC_LABELS[metric])
    if stacked:
        fig.subplots_adjust(hspace=0.3, top=1 - 0.8 / fig.get_figheight())
    seeds = sorted({b.seeds for b in bars})
    spread = "error bars: 1 sample s.d. over seeds" if seeds[-1] > 1 else "1 seed: no error bars"
    fig.suptitle(f"{title or f'Noisy-context QA: {METRIC_LABELS[metric]}'} ({spread})", fontsize=10)
    return _save(fig, path)


def plot_needle(result: EvalResults, path: str | Path, *, title: str | None = None) -> Path:
    """Needle-in-a-haystack heatmap: depth (rows) x context length (columns), exact match in each cell."""
    if not result.needle:
        raise ValueError(f"'{result.label}' has no needle results to plot")
    lengths = sorted({c.context_len for c in result.needle})
    depths = sorted({c.depth for c in result.needle})
    grid = torch.full((len(depths), len(lengths)), float("nan"))
    for c in result.needle:
        grid[depths.index(c.depth), lengths.index(c.context_len)] = c.exact_match
    fig, ax = plt.subplots(figsize=(1.2 * len(lengths) + 2, 0.6 * len(depths) + 1.5))
    im = ax.imshow(grid.numpy(), vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(lengths)), [str(x) for x in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:.2f}" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth (0 = start)")
    for i in range(len(depths)):
        for j in range(len(lengths)):
            v = float(grid[i, j])
            if not math.isnan(v):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8)
    fig.colorbar(im, ax=ax, label="exact match")
    ax.set_title(title or f"Pass-key retrieval: {result.label}")
    return _save(fig, path)


def plot_attention_to_gold(measures: Mapping[str, AttentionMeasures], path: str | Path, *,
                           title: str | None = None) -> Path:
    """Attention to gold (solid) and attention noise (dashed) per layer, one colour per model/method."""
    if not measures:
        raise ValueError("no attention measures to plot")
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for k, (label, m) in enumerate(measures.items()):
        color, _ = _style(k)
        ax.plot(m.layers, m.gold, marker="o", color=color, label=f"{label}: gold")
        ax.plot(m.layers, m.noise, marker="x", linestyle="--", color=color, label=f"{label}: noise")
    ax.axhline(0.0, color="grey", linewidth=0.8)
    # Layers are integers: label each one (matplotlib would otherwise put ticks at 0.2, 0.4, ... on a 2-layer model).
    layers = sorted({int(i) for m in measures.values() for i in m.layers})
    ax.set_xticks(layers)
    ax.set_xlabel("layer")
    ax.set_ylabel("attention mass (mean over heads)")
    ax.set_title(title or "Attention to gold vs noise per layer")
    ax.grid(alpha=0.3)
    _legend_outside(ax)
    return _save(fig, path)


def plot_attention_map(attention: torch.Tensor, gold_spans: Sequence[tuple[int, int]], path: str | Path, *,
                       query_rows: Sequence[int] | None = None, tokens: Sequence[str] | None = None,
                       title: str | None = None) -> Path:
    """Heatmap of one example's map (mean over heads if ``(H, N, N)`` is given) with the gold span marked.

    ``query_rows`` (default all) picks the rows shown. Differential maps are signed, so the colour scale is
    symmetric around zero (blue negative, red positive). Gold keys are outlined in green on the key axis.
    """
    a = attention.float()
    if a.dim() == 3:
        a = a.mean(0)
    if a.dim() != 2:
        raise ValueError(f"expected an (N, N) or (H, N, N) map, got shape {tuple(attention.shape)}")
    rows = list(range(a.shape[0])) if query_rows is None else list(query_rows)
    shown = a[rows]
    vmax = float(shown.abs().max()) or 1.0
    height = min(8.0, 2.0 + 0.08 * len(rows)) if len(rows) > 1 else 2.2
    fig, ax = plt.subplots(figsize=(min(16.0, 3 + 0.06 * a.shape[1]), height))
    im = ax.imshow(shown.numpy(), cmap="RdBu_r", vmin=-vmax, vmax=vmax, aspect="auto", interpolation="nearest")
    for s, e in gold_spans:
        ax.add_patch(plt.Rectangle((s - 0.5, -0.5), e - s, len(rows), fill=False, edgecolor="green", linewidth=2,
                                   label="gold span"))
    ax.set_xlabel("key position")
    ax.set_ylabel("query position")
    if len(rows) <= 40:
        ax.set_yticks(range(len(rows)), [str(r) for r in rows])
    if tokens is not None and len(tokens) == a.shape[1] and a.shape[1] <= 120:
        ax.set_xticks(range(len(tokens)), list(tokens), rotation=90, fontsize=6)
    fig.colorbar(im, ax=ax, label="combined map (signed)")
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        ax.legend(handles[:1], labels[:1], loc="upper left", fontsize=8)
    ax.set_title(title or "Attention map")
    return _save(fig, path)


__all__ = ["plot_accuracy", "plot_protocol_bars", "protocol_bars", "ProtocolBar", "plot_needle",
           "plot_attention_to_gold", "plot_attention_map", "accuracy_by_noise", "accuracy_lines", "AccuracyLine"]
