"""``report.md``, ``results.json`` and the plots of ``attndenoise study`` (:mod:`attndenoise.study`).

Every number and every verdict is computed from the saved answers; nothing is written in advance. Comparisons are
made within a protocol only: a row is set against its own baseline (same data, steps, seeds and trained layers).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .stats import paired_bootstrap, seed_verdict
from .study import BASE, StudyConfig, mean_sd, parse_row

#: the accuracy curve: distractors -> the settings averaged for it (9: the gold first, middle and last)
CURVE: dict[int, tuple[str, ...]] = {0: ("k0",), 4: ("k4",), 9: ("k9-first", "k9-middle", "k9-last"), 19: ("k19",)}
POSITIONS = ("k9-first", "k9-middle", "k9-last")
NOISY = (9, 19)


def per_model(answers: Mapping[str, Sequence[Mapping[str, Any]]],
              metric: str = "best_subspan_em") -> dict[str, dict[str, float]]:
    """model key -> setting -> ``metric`` (best-subspan EM by default) in % over the test questions."""
    out: dict[str, dict[str, float]] = {}
    for setting, rows in answers.items():
        keys = rows[0]["answers"].keys() if rows else ()
        for key in keys:
            vals = [float(r["answers"][key][metric] or 0.0) for r in rows]
            out.setdefault(key, {})[setting] = 100 * sum(vals) / len(vals)
    return out


def curve_point(scores: Mapping[str, float], k: int) -> float | None:
    names = [s for s in CURVE[k] if s in scores]
    return sum(scores[s] for s in names) / len(names) if names else None


def by_row(scores: Mapping[str, Mapping[str, float]], rows: Sequence[str], seeds: Sequence[int],
           value: Any) -> dict[str, list[float]]:
    """row label -> the per-seed values of ``value(scores of one model)`` (None values left out)."""
    out: dict[str, list[float]] = {}
    for label in rows:
        vals = [value(scores[f"{label}@{s}"]) for s in seeds if f"{label}@{s}" in scores]
        out[label] = [v for v in vals if v is not None]
    return out


def _fmt(vals: Sequence[float], digits: int = 1) -> str:
    if not vals:
        return "-"
    m, sd = mean_sd(vals)
    return f"{m:.{digits}f} ± {sd:.{digits}f}" if len(vals) > 1 else f"{m:.{digits}f}"


def noisy_score(scores: Mapping[str, float]) -> float | None:
    """Mean of the 9- and 19-distractor points: the settings where noise hurts the base most."""
    pts = [p for p in (curve_point(scores, k) for k in NOISY) if p is not None]
    return sum(pts) / len(pts) if pts else None


def verdict(cand: Sequence[float], ref: Sequence[float]) -> str:
    """Better / worse only when every seed of one lies beyond every seed of the other (:func:`seed_verdict`);
    else within the spread."""
    outcome, d = seed_verdict(cand, ref)
    return {"not measured": "not measured",
            "one seed": f"{d:+.1f} points (one seed: no spread to judge by)",
            "better": f"better, {d:+.1f} points (every seed above every baseline seed)",
            "worse": f"worse, {d:+.1f} points (every seed below every baseline seed)",
            "within": f"within the seed spread ({d:+.1f} points)"}[outcome]


def question_noisy(answers: Mapping[str, Sequence[Mapping[str, Any]]], keys: Sequence[str],
                   metric: str = "best_subspan_em") -> list[float] | None:
    """Per test question: the noisy score (:func:`noisy_score`'s weighting of the 9- and 19-distractor settings) in
    %, averaged over the model ``keys`` (a row's seeds); ``None`` when a key or a setting is missing."""
    names = {k: [s for s in CURVE[k] if s in answers] for k in NOISY}
    if not all(names.values()) or not keys:
        return None
    n = len(answers[names[NOISY[0]][0]])
    out = []
    for q in range(n):
        per_key = []
        for key in keys:
            pts = []
            for k in NOISY:
                rows = [answers[s][q]["answers"].get(key) for s in names[k]]
                if any(r is None for r in rows):
                    return None
                pts.append(sum(float(r[metric] or 0.0) for r in rows) / len(rows))  # type: ignore[index]
            per_key.append(100 * sum(pts) / len(pts))
        out.append(sum(per_key) / len(per_key))
    return out


def plot_protocols(scores: Mapping[str, Mapping[str, float]], rows: Sequence[str], seeds: Sequence[int],
                   groups: Sequence[tuple[str, Any]], path: Path, xlabel: str, title: str) -> Path:
    """One panel per protocol: grouped bars (one per row) at each x group, error bars = seed standard deviation,
    the untrained base as a dashed marker."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    protocols = list(dict.fromkeys(parse_row(r).protocol for r in rows))
    fig, axes = plt.subplots(1, len(protocols), figsize=(6.5 * len(protocols), 4.2), squeeze=False, sharey=True)
    for ax, protocol in zip(axes[0], protocols, strict=True):
        mine = [r for r in rows if parse_row(r).protocol == protocol]
        mine.sort(key=lambda r: parse_row(r).baseline is not None)  # the baseline first
        width = 0.8 / (len(mine) + 1)
        for j, label in enumerate([BASE, *mine]):
            xs, ms, sds = [], [], []
            for g, (_, fn) in enumerate(groups):
                vals = [fn(scores[BASE])] if label == BASE else by_row(scores, [label], seeds, fn)[label]
                vals = [v for v in vals if v is not None]
                if vals:
                    m, sd = mean_sd(vals)
                    xs.append(g + (j - len(mine) / 2) * width)
                    ms.append(m)
                    sds.append(sd)
            style: dict[str, Any] = {"color": "white", "edgecolor": "black", "hatch": "//"} if label == BASE else {}
            if label != BASE and parse_row(label).baseline is None:
                style = {"color": "0.45"}
            ax.bar(xs, ms, width, yerr=sds, capsize=2, label=label, **style)
        ax.set_xticks(range(len(groups)), [g for g, _ in groups])
        ax.set_xlabel(xlabel)
        ax.set_title(f"protocol: {protocol}")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    axes[0][0].set_ylabel("best-subspan EM (%)")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_study_report(out: Path, answers: Mapping[str, Sequence[Mapping[str, Any]]],
                       attention: Mapping[str, Mapping[str, Any]], needle: Mapping[str, float],
                       meta: Mapping[str, Any]) -> Path:
    cfg = meta["config"]
    rows, seeds = list(cfg["rows"]), list(cfg["seeds"])
    scores = per_model(answers)
    n = len(next(iter(answers.values()))) if answers else 0
    params = meta.get("trainable_parameters", {})
    groups = [(str(k), (lambda s, k=k: curve_point(s, k))) for k in CURVE]
    at9 = [s.split("-")[1] for s in CURVE[9] if s in answers]
    where = {"first": "first", "middle": "in the middle", "last": "last"}
    nine = (f"9 = mean over the gold {', '.join(at9[:-1])} and {at9[-1]}" if len(at9) > 1
            else f"9 = the gold passage {where[at9[0]]} only" if at9 else "9 not measured")
    plot_protocols(scores, rows, seeds, groups, out / "noise.png", "hard (BM25) distractors",
                   f"{cfg['model']}, {n} test questions; {nine}; bars: mean over "
                   f"{len(seeds)} seed(s), error bars: seed s.d.")
    pos_groups = [(p.split("-")[1], (lambda s, p=p: s.get(p))) for p in POSITIONS]
    plot_protocols(scores, rows, seeds, pos_groups, out / "position.png", "gold passage among 9 hard distractors",
                   f"{cfg['model']}, {n} test questions")

    train_minutes = sum(v or 0 for v in meta["train_seconds"].values()) / 60
    lines = [f"# Fine-tuning protocols on {cfg['model']}: each method against its own baseline", ""]
    lines += [
        f"Data: `{Path(cfg['data']).name}`, fixed split; training on the train split with {cfg['train_distractors']} "
        f"hard (BM25, answer-free) distractors, gold at a random position; {cfg['steps']} steps x batch "
        f"{cfg['batch_size']}; seeds {', '.join(map(str, seeds))}. Only the top {cfg['top_layers']} of "
        f"{meta['num_layers']} decoder layers are patched and trained (layers {meta['first_trained_layer']}-"
        f"{meta['num_layers'] - 1}); the papers patch all. Test: the first {n} questions of the test split, "
        "greedy, best-subspan EM in %.",
        f"Machine: {meta['machine']}. Wall time of this call {meta['wall_seconds'] / 60:.1f} min (load average "
        f"{meta['load_average']:.2f} at the end); training runs summed {train_minutes:.1f} min, test answers summed "
        f"{meta['eval_seconds'] / 60:.1f} min.", ""]
    sel = meta["selection"]
    lines += ["## Choices made on the validation split", "",
              f"Score: mean negative log-likelihood of the gold answer tokens, {cfg['val_n']} validation questions "
              f"with {cfg['train_distractors']} hard distractors, seed 0 (lower is better; the untrained base: "
              f"{sel['scores'].get('base', float('nan')):.4f}).", "",
              "| run | answer NLL |", "|---|---|"]
    lines += [f"| {k} | {v:.4f} |" for k, v in sel["scores"].items() if k != "base"]
    tried = {p: ", ".join(f"{x:g}" for x in v) for p, v in sel.get("lr_tried", {}).items()}
    lines += ["", "Chosen learning rate per protocol (a grid whose best value was its largest was extended by 3x, "
              "at most twice): " + ", ".join(
                  f"{p} {lr:g} (decided by `{sel['decided_by'][p]}`; tried {tried.get(p, '?')})"
                  for p, lr in sel["learning_rate"].items())
        + (f"; lambda schedule `{sel['lambda_schedule']}`" + (
            f" (decided by `{sel['schedule_decided_by']}`)" if sel.get("schedule_decided_by") else " (only one tried)")
           if sel.get("lambda_schedule") else "") + ".", ""]

    lines += ["## Accuracy against noise, per protocol", "",
              f"Mean ± s.d. over seeds. {nine.replace('9 =', '9 distractors:')}. Needle: pass-key "
              f"best-subspan EM at {cfg['needle_length']} tokens ({2 * cfg['needle_n']} keys; the training data has "
              "no pass-key examples, so this is the forgetting column). Attention to gold: share of the last prompt "
              f"position's attention on the gold passage, mean over the trained layers and heads, {cfg['attention_n']}"
              " prompts with 9 hard distractors (gold in the middle).", ""]
    att_base = attention.get(BASE, {})
    head = "| row | trainable params | " + " | ".join(f"{k}" for k in CURVE) + " | needle | attention to gold |"
    for protocol in dict.fromkeys(parse_row(r).protocol for r in rows):
        mine = [r for r in rows if parse_row(r).protocol == protocol]
        mine.sort(key=lambda r: parse_row(r).baseline is not None)
        lines += [f"### Protocol `{protocol}`", "", head, "|---|---|" + "---|" * (len(CURVE) + 2)]
        base_cells = [f"{curve_point(scores[BASE], k):.1f}" if curve_point(scores[BASE], k) is not None else "-"
                      for k in CURVE]
        lines.append(f"| base (untrained) | 0 | {' | '.join(base_cells)} | "
                     f"{100 * needle[BASE]:.1f} | {100 * att_base.get('mean_gold', float('nan')):.2f}% |"
                     if BASE in needle else f"| base (untrained) | 0 | {' | '.join(base_cells)} | - | - |")
        for label in mine:
            cells = [_fmt(by_row(scores, [label], seeds, lambda s, k=k: curve_point(s, k))[label]) for k in CURVE]
            nd = [100 * needle[f"{label}@{s}"] for s in seeds if f"{label}@{s}" in needle]
            at = [100 * attention[f"{label}@{s}"]["mean_gold"] for s in seeds if f"{label}@{s}" in attention]
            p = params.get(f"{label}@{seeds[0]}")
            lines.append(f"| {label} | {p:,} | {' | '.join(cells)} | {_fmt(nd)} | {_fmt(at, 2)}% |"
                         if p else f"| {label} | ? | {' | '.join(cells)} | {_fmt(nd)} | {_fmt(at, 2)}% |")
        lines.append("")
    lines += ["## Verdicts (within protocol, noisy settings: mean of the 9 and 19 points)", "",
              "The verdict is the seed rule: better or worse only when every seed of the row lies beyond every seed "
              "of its baseline. The question interval is the other source of noise: a 95% paired bootstrap interval "
              f"of the difference over the {n} test questions (each question's score averaged over the seeds; "
              "10,000 resamples). A difference whose interval holds 0 could come from the choice of questions alone.",
              "", "| row | baseline | row | baseline value | verdict | question interval |",
              "|---|---|---|---|---|---|"]
    noisy = by_row(scores, rows, seeds, noisy_score)
    verdicts = []
    for label in rows:
        r = parse_row(label)
        if r.baseline is None:
            continue
        ref = noisy.get(r.baseline, [])
        v = verdict(noisy[label], ref)
        verdicts.append((label, v))
        own = question_noisy(answers, [f"{label}@{s}" for s in seeds])
        theirs = question_noisy(answers, [f"{r.baseline}@{s}" for s in seeds])
        ci = "-"
        if own is not None and theirs is not None:
            lo, hi = paired_bootstrap([a - b for a, b in zip(own, theirs, strict=True)])
            ci = f"[{lo:+.1f}, {hi:+.1f}]"
        lines.append(f"| {label} | {r.baseline} | {_fmt(noisy[label])} | {_fmt(ref)} | {v} | {ci} |")
    better = [lab for lab, v in verdicts if v.startswith("better")]
    worse = [lab for lab, v in verdicts if v.startswith("worse")]
    lines += ["", ("Beyond the seed spread, better than its own baseline: " + (", ".join(better) or "none")
                   + "; worse: " + (", ".join(worse) or "none") + "."), ""]
    em = per_model(answers, "exact_match")
    lines += ["## Exact match", "",
              "Best-subspan EM counts an answer contained anywhere in the reply, which rewards long replies: the "
              "untrained chat model answers in sentences, a fine-tuned row with the answer alone. Exact match "
              "(SQuAD-normalised) beside it, same questions:", "",
              "| row | " + " | ".join(str(k) for k in CURVE) + " |", "|---|" + "---|" * len(CURVE),
              "| base | " + " | ".join(f"{curve_point(em[BASE], k):.1f}" if curve_point(em[BASE], k) is not None
                                      else "-" for k in CURVE) + " |"]
    for label in rows:
        cells = [_fmt(by_row(em, [label], seeds, lambda s, k=k: curve_point(s, k))[label]) for k in CURVE]
        lines.append(f"| {label} | {' | '.join(cells)} |")
    lines += [""]
    lines += ["## Gold position (9 hard distractors)", "", "| row | first | middle | last |", "|---|---|---|---|",
              "| base | " + " | ".join(f"{scores[BASE][p]:.1f}" if p in scores[BASE] else "-" for p in POSITIONS)
              + " |"]
    for label in rows:
        cells = [_fmt(by_row(scores, [label], seeds, lambda s, p=p: s.get(p))[label]) for p in POSITIONS]
        lines.append(f"| {label} | {' | '.join(cells)} |")
    lines += ["", "![accuracy against noise](noise.png)", "", "![gold position](position.png)", ""]
    lines += ["## Reproduce", "", "```", "attndenoise study --data " + cfg["data"] + f" --out {out}"
              + ("" if list(cfg["seeds"]) == [0, 1] else f" --seeds {','.join(map(str, seeds))}")
              + ("" if at9 == ["first", "middle", "last"] else f" --positions {','.join(at9)}")
              + f" --n {cfg['n']} --steps {cfg['steps']} --top-layers {cfg['top_layers']}"
              + ("" if cfg["attention_n"] == StudyConfig.attention_n else f" --attention-n {cfg['attention_n']}"),
              "```", ""]
    (out / "report.md").write_text("\n".join(lines))
    (out / "results.json").write_text(json.dumps(
        {"meta": meta, "scores": scores, "exact_match": em, "attention": attention, "needle": needle}, indent=1,
        default=str) + "\n")
    return out / "report.md"


__all__ = ["write_study_report", "per_model", "verdict", "curve_point"]
