"""The report of a robustness run: ``report.md``, ``results.json`` and three plots, written from the finished parts.

Every sentence of the summary is computed from the numbers (nothing is written in advance), so rerunning on another
model or data set gives a true report.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .io import atomic_write_json
from .plots import _save, plt


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _ci(row: Mapping[str, Any]) -> str:
    lo, hi = row["ci_best_subspan_em"]
    return f"{_pct(row['best_subspan_em'])} [{_pct(lo)}, {_pct(hi)}]"


def _yerr(rows: Sequence[Mapping[str, Any]]) -> list[list[float]]:
    """Matplotlib's asymmetric error bars (below, above) of best-subspan EM from each row's Wilson interval."""
    return [[r["best_subspan_em"] - r["ci_best_subspan_em"][0] for r in rows],
            [r["ci_best_subspan_em"][1] - r["best_subspan_em"] for r in rows]]


def _finish(fig: Any, ax: Any, path: Path, xlabel: str, title: str) -> Path:
    """The axes every accuracy plot shares (best-subspan EM on [0, 1]), then save."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel("best-subspan exact match")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    return _save(fig, path)


def _curve(results: Mapping[str, Mapping[str, Any]], kind: str) -> list[tuple[int, Mapping[str, Any]]]:
    rows = [(r["k"], r) for name, r in results.items() if name.startswith("curve-")
            and (r["kind"] == kind or r["k"] == 0)]
    return sorted(rows, key=lambda kr: kr[0])


def plot_distractors(results: Mapping[str, Mapping[str, Any]], path: Path, title: str) -> Path:
    """Best-subspan EM against the number of distractors, random and hard, with 95% Wilson intervals."""
    fig, ax = plt.subplots(figsize=(6.2, 4.0))
    kinds = sorted({r["kind"] for n, r in results.items() if n.startswith("curve-") and r["k"] > 0})
    for j, kind in enumerate(kinds):
        rows = _curve(results, kind)
        offset = (j - (len(kinds) - 1) / 2) * 0.25  # keep the error bars of the two lines apart
        ax.errorbar([k + offset for k, _ in rows], [r["best_subspan_em"] for _, r in rows],
                    yerr=_yerr([r for _, r in rows]), marker="os"[j % 2], capsize=3, label=f"{kind} distractors")
    sra = [(n.split("-")[2], r) for n, r in results.items() if n.startswith("sra-test-")]
    for name_tag, r in sra:
        tag = "SRA, authors' constants" if name_tag == "authors" else "SRA, chosen on validation"
        ax.errorbar([r["k"] + 0.4], [r["best_subspan_em"]], yerr=_yerr([r]),
                    marker="^" if name_tag == "authors" else "v", linestyle="none", capsize=3, label=tag)
    ax.set_xticks(sorted({r["k"] for n, r in results.items() if n.startswith("curve-")}))
    return _finish(fig, ax, path, "distractor passages around the gold passage", title)


def plot_positions(results: Mapping[str, Mapping[str, Any]], path: Path, title: str) -> Path:
    """Best-subspan EM against the gold passage's position (the "lost in the middle" curve)."""
    rows = [r for n, r in results.items() if n.startswith("position-")]
    k = rows[0]["k"]
    named = {"first": 1, "middle": k // 2 + 1, "last": k + 1}

    def place(r: Mapping[str, Any]) -> int:  # 1-based position of the gold passage
        return named[r["position"]] if r["position"] in named else int(r["position"]) + 1

    rows.sort(key=place)
    xs = [place(r) for r in rows]
    fig, ax = plt.subplots(figsize=(5.2, 3.8))
    ax.errorbar(xs, [r["best_subspan_em"] for r in rows], yerr=_yerr(rows), marker="o", capsize=3,
                label=f"gold among {k} hard distractors")
    oracle = results.get("curve-none-0")
    if oracle is not None:
        ax.axhline(oracle["best_subspan_em"], linestyle="--", color="grey", label="gold passage alone")
    ax.set_xticks(xs)
    return _finish(fig, ax, path, f"position of the gold passage (1 = first of {k + 1})", title)


def plot_attention(att: Mapping[str, Any], path: Path, title: str) -> Path:
    """Attention to the gold passage per layer (mean and spread over examples) against an even spread."""
    import statistics

    layers = att["layers"]
    per = att["per_example_gold"]
    sd = [statistics.stdev(p[i] for p in per) if len(per) > 1 else 0.0 for i in range(len(layers))]
    fig, ax = plt.subplots(figsize=(6.2, 3.6))
    ax.plot(layers, att["gold"], marker="o", label=f"attention to gold (mean of {att['n']} examples)")
    ax.fill_between(layers, [g - s for g, s in zip(att["gold"], sd, strict=True)],
                    [g + s for g, s in zip(att["gold"], sd, strict=True)], alpha=0.2, label="± 1 s.d.")
    ax.axhline(att["uniform_gold"], linestyle="--", color="grey", label="even spread over the prompt")
    ax.set_xlabel("layer")
    ax.set_ylabel("share of the last position's attention")
    ax.set_xticks(layers[:: max(1, len(layers) // 15)])
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    return _save(fig, path)


def _summary(results: Mapping[str, Mapping[str, Any]], meta: Mapping[str, Any]) -> list[str]:
    lines = []
    oracle = results.get("curve-none-0")
    for kind in ("random", "hard"):
        rows = [(k, r) for k, r in _curve(results, kind) if k > 0]
        if oracle and rows:
            k, worst = rows[-1]
            lines.append(f"- With {kind} distractors best-subspan EM goes from {_pct(oracle['best_subspan_em'])}% "
                         f"(gold passage alone) to {_pct(worst['best_subspan_em'])}% with {k} distractors.")
    pos = [r for n, r in results.items() if n.startswith("position-")]
    if pos:
        best = max(pos, key=lambda r: r["best_subspan_em"])
        worst = min(pos, key=lambda r: r["best_subspan_em"])
        lines.append(f"- Gold position: best {best['position']} ({_pct(best['best_subspan_em'])}%), worst "
                     f"{worst['position']} ({_pct(worst['best_subspan_em'])}%); the intervals "
                     + ("overlap" if worst["ci_best_subspan_em"][1] >= best["ci_best_subspan_em"][0]
                        else "do not overlap") + ".")
    sra = {n.split("-")[2]: r for n, r in results.items() if n.startswith("sra-test-")}
    base = {r["k"]: r for n, r in results.items() if n.startswith("curve-hard-")}
    for tag, r in sorted(sra.items()):
        b = base.get(r["k"])
        if b is not None:
            d = r["best_subspan_em"] - b["best_subspan_em"]
            overlap = r["ci_best_subspan_em"][0] <= b["ci_best_subspan_em"][1] and \
                b["ci_best_subspan_em"][0] <= r["ci_best_subspan_em"][1]
            lines.append(f"- SRA ({'authors' if tag == 'authors' else 'chosen on validation'}) at {r['k']} hard "
                         f"distractors: {_pct(r['best_subspan_em'])}% vs {_pct(b['best_subspan_em'])}% for the "
                         f"base ({'+' if d >= 0 else ''}{_pct(d)} points on the same {r['n']} questions; the "
                         f"intervals {'overlap' if overlap else 'do not overlap'}).")
    ems = [r["exact_match"] for n, r in results.items() if "exact_match" in r]
    if ems and max(ems) < 0.05:
        lines.append("- Exact match is near 0 everywhere: the model answers in a sentence (\"The capital of France "
                     "is Paris.\"), which is what best-subspan EM was made for.")
    return lines


def write_report(out: Path, results: Mapping[str, Mapping[str, Any]], meta: Mapping[str, Any]) -> Path:
    """Write ``report.md``, ``results.json`` and the plots into ``out``; returns the report's path."""
    out.mkdir(parents=True, exist_ok=True)
    cfg = meta["config"]
    title = f"{cfg['model']}, {meta['test_questions']} test questions"
    figures = []
    if any(n.startswith("curve-") for n in results):
        figures.append(plot_distractors(results, out / "distractors.png", title))
    if any(n.startswith("position-") for n in results):
        figures.append(plot_positions(results, out / "position.png", title))
    att_name = next((n for n in results if n.startswith("attention-")), None)
    if att_name:
        figures.append(plot_attention(results[att_name], out / "attention.png", title))
    slim = {n: {k: v for k, v in r.items() if k != "predictions"} for n, r in results.items()}
    atomic_write_json(out / "results.json", {"meta": meta, "results": slim})

    reused = any(r.get("reused") for r in results.values())
    md = [f"# How retrieval noise hurts {cfg['model']}", "",
          f"Data: `{Path(cfg['data']).name}`, split sizes train / validation / test = "
          f"{' / '.join(map(str, meta['split_sizes']))}; the first {meta['test_questions']} test questions in every "
          f"setting (the same questions and the same passages for every row), SRA settings chosen on the first "
          f"{meta['validation_questions']} validation questions. Greedy decoding, at most {cfg['max_new_tokens']} new "
          "tokens, the answer line only; the prompt of *Lost in the Middle* through the model's chat template. "
          "Best-subspan EM: any SQuAD-normalised gold answer inside the normalised prediction; brackets: 95% Wilson "
          "interval.", "",
          f"Machine: {meta['machine']}. Measuring time, summed over the parts: "
          f"{meta.get('parts_seconds', 0) / 60:.1f} min; this run's wall time {meta['wall_seconds'] / 60:.1f} min"
          + (" (it reused parts measured earlier)" if reused else "")
          # the load says something about the times only when this run measured them all
          + (f"; 1-minute load average at the end {meta['load_average']:.1f}"
             if "load_average" in meta and not reused else "")
          + ".", "", "## Summary", "", *_summary(results, meta), ""]
    md += ["## Accuracy against the number of distractors", "",
           "| distractors | kind | best-subspan EM % [95% CI] | EM % | F1 % | prompt tokens | s / question |",
           "|---|---|---|---|---|---|---|"]
    for name in sorted((n for n in results if n.startswith("curve-")), key=lambda n: (results[n]["k"], n)):
        r = results[name]
        md.append(f"| {r['k']} | {r['kind'] if r['k'] else '-'} | {_ci(r)} | {_pct(r['exact_match'])} | "
                  f"{_pct(r['f1'])} | {r['mean_prompt_tokens']:.0f} | {r['seconds'] / r['n']:.1f} |")
    pos = [n for n in results if n.startswith("position-")]
    if pos:
        md += ["", f"## Gold position ({results[pos[0]]['k']} hard distractors)", "",
               "| gold position | best-subspan EM % [95% CI] | EM % | F1 % |", "|---|---|---|---|"]
        for n in pos:
            r = results[n]
            md.append(f"| {r['position']} | {_ci(r)} | {_pct(r['exact_match'])} | {_pct(r['f1'])} |")
    if att_name:
        att = results[att_name]
        top = sorted(range(len(att["layers"])), key=lambda i: -att["gold"][i])[:5]
        md += ["", f"## Attention to the gold passage ({att['n']} examples, {cfg['position_distractors']} hard "
               "distractors)", "",
               f"From the position that generates the answer, averaged over heads. An even spread over the prompt "
               f"would give the gold passage {_pct(att['uniform_gold'])}% of the attention; the layers that give it "
               "most: " + ", ".join(f"layer {att['layers'][i]} ({_pct(att['gold'][i])}%)" for i in top)
               + f"; the mean over layers is {_pct(sum(att['gold']) / len(att['gold']))}%."]
    val = sorted((n for n in results if n.startswith("sra-val-")), key=lambda n: int(n.rsplit("-", 1)[1]))
    if val:
        vb = next((results[n] for n in results if n.startswith("val-base-")), None)
        md += ["", "## SRA (Scaled ReAttention, inference only)", "",
               "Chosen on the validation split (first row: the authors' `init_sra` constants, which win ties):", "",
               "| setting | validation best-subspan EM % |", "|---|---|"]
        if vb is not None:
            md.append(f"| base model (no SRA) | {_ci(vb)} |")
        for n in val:
            r = results[n]
            opts = ", ".join(f"{k}={v}" for k, v in r["sra"].items())
            md.append(f"| {opts} | {_ci(r)} |")
        tests = [n for n in results if n.startswith("sra-test-")]
        if tests:
            md += ["", "On the test split:", "", "| setting | distractors | best-subspan EM % [95% CI] | EM % |",
                   "|---|---|---|---|"]
            for n in tests:
                r = results[n]
                md.append(f"| SRA, {n.split('-')[2]} | {r['k']} hard | "
                          f"{_ci(r)} | {_pct(r['exact_match'])} |")
    md += ["", "## Figures", ""] + [f"![{p.stem}]({p.name})" for p in figures]
    flags = f"--model {cfg['model']} --n {cfg['n']} --sra-val-n {cfg['sra_val_n']}"
    flags += f" --threads {cfg['threads']}" if cfg.get("threads") else ""
    md += ["", f"Reproduce: `attndenoise robustness --data {Path(cfg['data']).name} {flags} --out {out}` "
           "(finished parts in `parts/` are reused; a changed setting re-runs only the parts it touches).", ""]
    report = out / "report.md"
    report.write_text("\n".join(md))
    return report
