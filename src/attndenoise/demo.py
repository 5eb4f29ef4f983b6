"""``attndenoise demo``: does denoising help on the embedded default? Train every method, measure, report.

What one run does (issues 7 and 14; every step uses the public API, so the demo is also a worked example):

1. build or reuse the embedded tiny model (:func:`attndenoise.tiny.tiny_model_path`);
2. for each seed, train the rows with :func:`attndenoise.train`, on the same synthetic noisy-context data (noise ratio
   ``train_noise``), the same number of steps and batch size. Rows are named as in :mod:`attndenoise.study`
   (:func:`attndenoise.study.parse_row`), one training protocol each, compared only with that protocol's baseline:

   * ``<method>+attn`` -- the method and the attention projections (q/k/v/o) train together, the DAA paper's
     protocol; baseline ``none`` (the projections alone);
   * ``<method>+lora`` -- the method trains beside a LoRA, as OpAmp trains with QLoRA; baseline ``lora``;
   * ``<method>`` -- only the method's parameters train; baseline ``lora~<method>``, a LoRA whose rank gives about
     the method's trainable-parameter count (:func:`matched_lora_rank`).

   By default each trainable method runs in the protocol its paper used (:func:`paper_row`: OpAmp with LoRA, the
   others with the attention projections), plus ``none`` and ``lora``; ``all_protocols`` runs every method in every
   protocol;
3. apply SRA (inference only) to the base model;
4. evaluate the base model, SRA and every trained model with :func:`attndenoise.evaluate.evaluate_model`: noisy-QA
   accuracy at ``eval_noise`` ratios, the needle grid (pass-key retrieval: the training data has none, so it measures
   forgetting), and the attention-to-gold measures (:func:`attndenoise.measures.dataset_attention`) on the
   same examples for every model;
5. write ``report.md`` (tables with mean and spread across seeds, each row's protocol and trainable-parameter count,
   and which rows beat their own protocol's baseline at noise >= 0.8 beyond the seed spread), ``results.json`` /
   ``results.csv``, ``attention.json`` and PNG plots (``protocols.png``: bars per protocol).

Everything is keyed by seed: the base model, the training data and the evaluation examples are the same for every
method of a seed, so differences between rows come from the methods alone. Finished training runs are reused when the
demo is run again with the same settings (a run directory holds its ``run.json``), so ``--seeds 3`` after a default
run only trains the new seeds.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from . import registry
from .data import SyntheticQA, noisy_examples, num_distractors
from .evaluate import EvalResults, evaluate_model, write_results
from .measures import AttentionMeasures, dataset_attention
from .patch import apply
from .plots import plot_attention_to_gold, plot_needle, plot_protocol_bars
from .progress import eta_seconds, format_seconds
from .registry import inference_methods, trainable_methods
from .stats import mean_sd, seed_verdict
from .study import PAPER_ROWS, Row, full_rows, parse_row
from .tiny import tiny_model_path
from .train import BASELINES, RUN_FILE, TrainConfig, load_trained, matched_lora_rank, train

#: the label of the untouched base model in tables and plots
BASE_LABEL = "base"
#: protocol -> what it trains and what it is compared with (report and plot titles)
PROTOCOLS: dict[str, str] = {
    "attention": "method + q/k/v/o fine-tuning, vs none",
    "lora": "method + LoRA, vs lora",
    "alone": "method alone, vs a LoRA of matched size",
    "inference": "inference only, vs base",
}
_ORDER = tuple(PROTOCOLS)


def paper_row(method: str) -> str:
    """The row of ``method`` in the protocol its paper used (:data:`attndenoise.study.PAPER_ROWS`: OpAmp with
    LoRA, the differential methods with the attention projections); ``<method>+attn`` for a method not listed there."""
    for label in PAPER_ROWS:
        row = parse_row(label)
        if row.baseline is not None and row.method == method:
            return label
    return f"{method}+attn"


def protocol_of(label: str) -> str:
    """``attention``, ``lora``, ``alone`` (:func:`attndenoise.study.parse_row`), ``inference`` for the base and SRA."""
    if label == BASE_LABEL or label in inference_methods():
        return "inference"
    return parse_row(label).protocol


def baseline_of(label: str) -> str | None:
    """The row a row is judged against: its own protocol's baseline (``<m>+attn`` -> ``none``, ``<m>+lora`` ->
    ``lora``, ``<m>`` -> ``lora~<m>``), the base model for inference-only rows, ``None`` for baselines and base."""
    if label == BASE_LABEL:
        return None
    if label in inference_methods():
        return BASE_LABEL
    return parse_row(label).baseline


def _row_method(row: Row) -> str | None:
    """The method a row is about: its own method, or the one a matched LoRA matches; ``None`` for none / lora."""
    return row.matched or (row.method if row.method not in BASELINES else None)


def _order_key(label: str) -> tuple[int, int]:
    """Protocols in :data:`PROTOCOLS` order, each baseline first (a matched LoRA just before its method)."""
    return _ORDER.index(protocol_of(label)), 0 if baseline_of(label) is None else 1


@dataclass
class DemoConfig:
    """Settings of a demo run (recorded in ``demo_out/settings.json``).

    The defaults are sized to finish in about 10 minutes on 2 CPU cores with the tiny model cached (see README).

    Attributes:
        out: output directory. seeds: how many seeds (each seed: its own training data order, initialisation of
            LoRA/method parameters and evaluation examples).
        methods: trainable methods to train (default: all of them), each in the protocol its paper used
            (:func:`paper_row`); baselines ``none`` and ``lora`` always run.
        all_protocols: train every chosen method in every protocol instead: ``<m>+attn``, ``<m>+lora``, ``<m>``
            alone and its matched LoRA ``lora~<m>`` (``attndenoise demo --all-protocols``).
        steps / batch_size / learning_rate / max_length: the training budget, the same for every row.
        train_noise: noise ratio of the training contexts (0.8 = four distractors per gold document).
        train_noise_mix: a noise mix instead: each training example gets a ratio drawn from this list (seeded);
            ``None`` trains at ``train_noise`` only.
        method_options: per-method config overrides, ``{"daa": {"anneal_steps": 50}}``; a method's entry applies
            to every row of that method (``daa+attn``, ``daa+lora``, ``daa``), an entry keyed by a row label
            (``"daa+lora"``) adds to it for that row alone; an inference-only method's entry (``"sra"``) configures
            it on the base model. ``sra_options`` (deprecated) is ``method_options["sra"]``.
        learning_rates: learning-rate overrides keyed by row label, ``{"opamp": 5e-4}`` (OpAmp; chosen on a
            validation split; every row still gets the same steps, batch size and data): a row takes its own
            label's entry, else its protocol baseline's (``+attn`` rows ``none``'s, ``+lora`` rows and matched
            LoRAs ``lora``'s), else ``learning_rate``. A method's entry is the rate of that method's own
            parameters in every row of it (alone: the whole run; ``+attn`` / ``+lora``: ``method_lr``, beside
            the projections or the LoRA at the baseline's rate).
        eval_noise: noise ratios of the QA evaluation. n_eval: QA examples per ratio.
        context_lengths / depths / needle_n: the needle grid.
        attention_examples: examples (at noise ``attention_noise``) for the attention-to-gold measures.
        tiny: ``TinyConfig`` overrides for the base model (tests use a model built in seconds).
        threads: torch intra-op threads.
    """

    # Every default below was chosen on a validation split, never on the test questions: docs/decisions.md,
    # section demo.py, has the measurements behind each.
    out: str = "demo_out"
    seeds: int = 1
    methods: Sequence[str] | None = None
    all_protocols: bool = False
    steps: int = 150
    batch_size: int = 16
    learning_rate: float = 2e-3
    max_length: int = 512
    train_noise: float = 0.8
    train_noise_mix: Sequence[float] | None = None
    synthetic_examples: int = 2400
    method_options: dict[str, dict[str, Any]] = field(default_factory=lambda: {
        **{m: {"lambda_schedule": "linear"} for m in ("daa", "diffq", "diffk", "diff", "dint")},
        "sra": {"b": 2, "t": 24, "alpha_inter": 0.25, "alpha_outer": 0.25, "strengthen_inter": 2.0,
                "strengthen_outer": 2.0, "short_prompt": "skip"}})
    learning_rates: dict[str, float] = field(default_factory=lambda: {"opamp": 5e-4})
    sra_options: dict[str, Any] | None = None  # deprecated: method_options["sra"]
    eval_noise: Sequence[float] = (0.0, 0.5, 0.8, 0.9)
    n_eval: int = 100
    context_lengths: Sequence[int] = (64, 128, 256)
    depths: Sequence[float] = (0.0, 0.5, 1.0)
    needle_n: int = 3
    attention_examples: int = 16
    attention_noise: float = 0.8
    tiny: dict[str, Any] = field(default_factory=dict)
    cache_dir: str | None = None
    threads: int | None = None

    def __post_init__(self) -> None:
        if self.sra_options is not None:
            warnings.warn('DemoConfig.sra_options is deprecated: give method_options={"sra": {...}}',
                          DeprecationWarning, stacklevel=3)
            self.method_options = {**self.method_options,
                                   "sra": {**self.method_options.get("sra", {}), **self.sra_options}}
            self.sra_options = None
        known = trainable_methods()
        methods = list(known if self.methods is None else self.methods)
        unknown = [m for m in methods if m not in known]
        if unknown:
            raise ValueError(f"unknown or non-trainable method(s) {', '.join(unknown)}; trainable: {', '.join(known)}")
        self.methods = methods
        if self.seeds < 1:
            raise ValueError(f"seeds must be >= 1, got {self.seeds}")
        for name in ("steps", "batch_size", "n_eval", "needle_n", "attention_examples"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        # The default override names opamp; running a subset of methods without it must not fail.
        unknown_lr = sorted(k for k in self.learning_rates if k not in known and not _is_row(k))
        if unknown_lr:
            raise ValueError(f"learning_rates names unknown row(s): {', '.join(unknown_lr)}; give a row label "
                             "(none, lora, <m>+attn, <m>+lora, <m>, lora~<m>) or a trainable method")
        bad_opts = sorted(k for k in self.method_options if k not in known and k not in inference_methods() and not (
            _is_row(k) and parse_row(k).method not in BASELINES))
        if bad_opts:
            raise ValueError(f"method_options names unknown method(s) or row(s): {', '.join(bad_opts)}; give a "
                             f"method ({', '.join(sorted(registry.METHODS))}) or a row with a trainable one "
                             "(<m>+attn, <m>+lora, <m>)")
        if any(not lr > 0 for lr in self.learning_rates.values()):
            raise ValueError("learning_rates must be positive")
        if self.train_noise_mix is not None and not list(self.train_noise_mix):
            raise ValueError("train_noise_mix: give at least one ratio, or None")
        for r in (*self.eval_noise, self.train_noise, *(self.train_noise_mix or ()), self.attention_noise):
            if not 0.0 <= r < 1.0:
                raise ValueError(f"noise ratios must be in [0, 1), got {r}")

    def learning_rate_for(self, label: str) -> float:
        """The learning rate of a trained row: the override keyed by its own label, else its protocol baseline's
        (a ``+attn`` row trains at ``none``'s rate, a ``+lora`` row and a matched LoRA at ``lora``'s: a comparison
        within a protocol never mixes learning rates), else ``learning_rate``. ``{"opamp": 5e-4}`` is the rate of
        OpAmp trained alone."""
        row = parse_row(label)
        baseline = "lora" if row.matched else (row.baseline if row.protocol != "alone" else None)
        for key in (label, baseline):
            if key is not None and key in self.learning_rates:
                return float(self.learning_rates[key])
        return float(self.learning_rate)

    def method_lr_for(self, label: str) -> float | None:
        """For a ``+attn`` / ``+lora`` row of a method with its own ``learning_rates`` entry: that rate for the
        method's parameters (``TrainConfig.method_lr``), the projections or LoRA keeping the baseline's rate."""
        row = parse_row(label)
        if row.protocol in ("attention", "lora") and row.baseline is not None and row.method in self.learning_rates:
            return float(self.learning_rates[row.method])
        return None

    def method_options_for(self, label: str) -> dict[str, Any]:
        """The method config overrides of a trained row: lambda annealing over the first half of the budget (the
        library default, 1000 steps, would leave lambda near 0 for a short demo run), then the method's
        ``method_options`` entry, then the row label's own entry; nothing for the baselines and matched LoRAs."""
        row = parse_row(label)
        if row.method in BASELINES:
            return {}
        own = self.method_options.get(label, {}) if label != row.method else {}
        return {"anneal_steps": max(1, self.steps // 2), **self.method_options.get(row.method, {}), **own}

    def trained_rows(self) -> list[str]:
        """The trained rows in report order (protocol by protocol, each baseline first): ``none``, ``lora`` and
        each method in its paper's protocol, or with ``all_protocols`` every method in every protocol."""
        chosen = list(self.methods or ())
        if self.all_protocols:
            picked = [r for r in full_rows() if _row_method(parse_row(r)) in chosen or r in BASELINES]
        else:
            picked = [*BASELINES, *(paper_row(m) for m in chosen)]
        rank = {m: i for i, m in enumerate(chosen)}
        return sorted(dict.fromkeys(picked), key=lambda r: (
            _order_key(r)[0], r not in BASELINES, rank.get(_row_method(parse_row(r)) or "", -1), _order_key(r)[1]))

    def labels(self) -> list[str]:
        """Row labels in report order: base, inference-only methods, then :meth:`trained_rows`."""
        return [BASE_LABEL, *inference_methods(), *self.trained_rows()]


def _is_row(label: str) -> bool:
    try:
        parse_row(label)
    except ValueError:
        return False
    return True


Progress = Callable[[str], None]


def _log(progress: Progress | None, message: str) -> None:
    if progress is not None:
        progress(message)


def _load_base(path: Path) -> tuple[nn.Module, Any]:
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model.eval(), tokenizer


def train_config(cfg: DemoConfig, base: Path, label: str, seed: int, run_dir: Path,
                 lora_rank: int | None = None) -> TrainConfig:
    """The :class:`attndenoise.train.TrainConfig` of one demo row: its protocol decides the kind
    (``<m>+attn``: ``attention=True``, ``<m>+lora``: ``lora=True``, ``lora~<m>``: plain LoRA of rank ``lora_rank``)."""
    row = parse_row(label)
    return TrainConfig(
        model=str(base), method=row.method, data="synthetic", out=str(run_dir), noise=cfg.train_noise,
        noise_mix=None if cfg.train_noise_mix is None else [float(r) for r in cfg.train_noise_mix], steps=cfg.steps,
        batch_size=cfg.batch_size, learning_rate=cfg.learning_rate_for(label),
        method_lr=cfg.method_lr_for(label), max_length=cfg.max_length, seed=seed,
        synthetic_examples=cfg.synthetic_examples, save_steps=cfg.steps, save_total_limit=1,
        method_options=cfg.method_options_for(label), progress=False,
        attention=row.protocol == "attention" and row.method != "none",
        lora=row.protocol == "lora" and row.method != "lora",
        lora_rank=TrainConfig.lora_rank if lora_rank is None else lora_rank,
    )


_TRAIN_DEFAULTS = TrainConfig().to_dict()


def _train_or_reuse(cfg: DemoConfig, base: Path, label: str, seed: int, run_dir: Path,
                    lora_rank: int | None = None) -> tuple[nn.Module, Any, dict[str, Any], bool]:
    """A trained model for ``label``, its tokenizer, the run's ``run.json`` content and whether the run was reused:
    reuse a finished run with the same settings, else train it now. A setting that a run recorded before the field
    existed counts as the field's default (``attention`` / ``lora`` were added later: a run of the demo's earlier
    method-alone rows is still reused by the ``<m>`` row)."""
    tconf = train_config(cfg, base, label, seed, run_dir, lora_rank)
    run_file = run_dir / RUN_FILE
    if run_file.exists():
        run = json.loads(run_file.read_text())
        recorded = run.get("config", {})
        wanted = {k: v for k, v in tconf.to_dict().items() if k not in ("progress", "resume", "force_resume")}
        if all(recorded.get(k, _TRAIN_DEFAULTS.get(k)) == v for k, v in wanted.items()):
            model, tokenizer = _load_base(base)
            return load_trained(model, run_dir).eval(), tokenizer, run, True
        raise FileExistsError(f"{run_dir} holds a run with other settings; remove it or choose another --out")
    model, tokenizer = _load_base(base)
    result = train(tconf, model=model, tokenizer=tokenizer)
    return result.model.eval(), tokenizer, result.run, False


def _attention_examples(cfg: DemoConfig, seed: int) -> list[Any]:
    raw = SyntheticQA(seed=seed, split="test").examples(cfg.attention_examples)
    return noisy_examples(raw, cfg.attention_noise, seed=seed + 1000)


def _fmt(values: Sequence[float], digits: int = 3) -> str:
    mean, sd = mean_sd(values)
    return f"{mean:.{digits}f}" if len(values) == 1 else f"{mean:.{digits}f} ± {sd:.{digits}f}"


def run_demo(cfg: DemoConfig, progress: Progress | None = None) -> Path:
    """Run the whole demo and return the path of ``report.md``."""
    start = time.perf_counter()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "settings.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2, default=list) + "\n")

    _log(progress, "base model: building or reusing the embedded tiny model")
    t0 = time.perf_counter()
    base = tiny_model_path(cfg.cache_dir, threads=cfg.threads, **cfg.tiny)
    base_seconds = time.perf_counter() - t0

    results: list[EvalResults] = []
    attention: dict[str, list[AttentionMeasures]] = {}
    train_seconds: dict[str, list[float]] = {}
    params: dict[str, int] = {BASE_LABEL: 0, **{m: 0 for m in inference_methods()}}
    ranks: dict[str, int] = {}  # lora~<m> -> its LoRA rank
    reused = 0  # training runs found finished in `out` (their time is not in this invocation's total)
    labels = cfg.labels()
    # One progress line per finished row with elapsed time and ETA; a trained row costs far more than an evaluated
    # one, so the ETA prices each kind at its own mean so far (attndenoise.progress.eta_seconds).
    kind = {label: "evaluated" if label == BASE_LABEL or label in inference_methods() else "trained"
            for label in labels}
    remaining = {k: cfg.seeds * sum(v == k for v in kind.values()) for k in ("evaluated", "trained")}
    row_seconds: dict[str, list[float]] = {"evaluated": [], "trained": []}
    rows_total, rows_done = cfg.seeds * len(labels), 0
    matched = [lab for lab in cfg.trained_rows() if parse_row(lab).matched]
    if matched:
        probe, _ = _load_base(base)
        for lab in matched:
            m = parse_row(lab).matched
            assert m is not None
            ranks[lab] = matched_lora_rank(probe, m, cfg.method_options_for(m))
        del probe
    for seed in range(cfg.seeds):
        att_examples = _attention_examples(cfg, seed)
        for label in labels:
            row_start = time.perf_counter()
            if label == BASE_LABEL:
                model, tokenizer = _load_base(base)
            elif label in inference_methods():
                model, tokenizer = _load_base(base)
                apply(model, registry.config_for(label, **cfg.method_options.get(label, {})))
            else:
                _log(progress, f"seed {seed}: training {label} ({cfg.steps} steps)")
                model, tokenizer, run, was_reused = _train_or_reuse(
                    cfg, base, label, seed, out / "runs" / f"seed{seed}" / label, ranks.get(label))
                reused += was_reused
                if run.get("trainable_parameters") is not None:
                    params.setdefault(label, int(run["trainable_parameters"]))
                # The training loop's own time, recorded in run.json: the same whether this call trained the run or
                # reused it (wall time here would mix training with a reload).
                train_seconds.setdefault(label, []).append(float(run["seconds"]))
            _log(progress, f"seed {seed}: evaluating {label}")
            with torch.no_grad():
                res = evaluate_model(
                    model, tokenizer, label=label, tasks=("noisy-qa", "needle"), seed=seed,
                    noise_ratios=cfg.eval_noise, n=cfg.n_eval, context_lengths=cfg.context_lengths,
                    depths=cfg.depths, needle_n=cfg.needle_n, batch_size=32, max_new_tokens=8,
                )
                results.append(res)
                attention.setdefault(label, []).append(dataset_attention(model, tokenizer, att_examples))
            del model
            row_seconds[kind[label]].append(time.perf_counter() - row_start)
            remaining[kind[label]] -= 1
            rows_done += 1
            _log(progress, f"row {rows_done}/{rows_total} done: {label} (seed {seed}) in "
                           f"{format_seconds(row_seconds[kind[label]][-1])}; elapsed "
                           f"{format_seconds(time.perf_counter() - start)}, ETA "
                           f"{format_seconds(eta_seconds(row_seconds, remaining))}")

    _log(progress, "writing the report")
    write_results(results, out)
    (out / "attention.json").write_text(json.dumps(
        {k: [dataclasses.asdict(m) for m in v] for k, v in attention.items()}, indent=2) + "\n")
    plots = {
        "protocols": plot_protocols(cfg, results, out / "protocols.png"),
        "attention": plot_attention_to_gold({k: _mean_measures(v) for k, v in attention.items()},
                                            out / "attention_to_gold.png"),
        "needle_base": plot_needle(results[0], out / "needle_base.png", title="Needle retrieval: base model"),
    }
    total = time.perf_counter() - start
    report = out / "report.md"
    report.write_text(render_report(cfg, results, attention, train_seconds, plots, total,
                                     base_seconds=base_seconds, reused=reused, params=params, ranks=ranks,
                                     load_average=os.getloadavg()[0]) + "\n")
    _log(progress, f"done in {total:.0f} s: {report}")
    return report


def protocol_panels(labels: Sequence[str]) -> dict[str, list[str]]:
    """Panel title -> rows, one panel per protocol present (:data:`PROTOCOLS`), rows in report order."""
    panels: dict[str, list[str]] = {}
    for protocol, title in PROTOCOLS.items():
        mine = [lab for lab in labels if lab != BASE_LABEL and protocol_of(lab) == protocol]
        if mine:
            panels[title] = mine
    return panels


def noise_label(ratio: float) -> str:
    """A noise ratio with its number of distractors per gold document, for plot axes: ``0.9 (9)``."""
    return f"{ratio:g} ({num_distractors(ratio)})"


def plot_protocols(cfg: DemoConfig, results: Sequence[EvalResults], path: Path) -> Path:
    """The demo's accuracy figure: one panel per protocol, each row a bar per noise ratio (mean over seeds, error bar
    one s.d.), the base as the hatched reference bar in every panel (:func:`attndenoise.plots.plot_protocol_bars`)."""
    labels = [lab for lab in cfg.labels() if any(r.label == lab for r in results)]
    keys = {lab: _row_method(parse_row(lab)) or lab for lab in labels if protocol_of(lab) != "inference"}
    return plot_protocol_bars(
        results, protocol_panels(labels), path, reference=BASE_LABEL,
        baselines=[lab for lab in labels if protocol_of(lab) != "inference" and baseline_of(lab) is None],
        groups=cfg.eval_noise, group_label=noise_label, colour_key=keys,
        xlabel="noise ratio (distractors)",
        title=f"Noisy-context QA, exact match, {cfg.n_eval} questions per ratio and seed, {cfg.seeds} seed(s); "
              "groups: noise ratio (distractors per gold document)")


def _mean_measures(items: Sequence[AttentionMeasures]) -> AttentionMeasures:
    """The per-layer mean over seeds (each seed's measures already average its examples)."""
    k = len(items)
    first = items[0]
    return dataclasses.replace(
        first,
        gold=[sum(m.gold[i] for m in items) / k for i in range(len(first.layers))],
        noise=[sum(m.noise[i] for m in items) / k for i in range(len(first.layers))],
        n=sum(m.n for m in items), per_example_gold=[g for m in items for g in m.per_example_gold],
    )


def _by_label(results: Sequence[EvalResults]) -> dict[str, list[EvalResults]]:
    table: dict[str, list[EvalResults]] = {}
    for r in results:
        table.setdefault(r.label, []).append(r)
    return table


def _qa(rs: Sequence[EvalResults], ratio: float, metric: str) -> list[float]:
    return [getattr(q, metric) for r in rs for q in r.qa if q.noise_ratio is not None
            and math.isclose(q.noise_ratio, ratio)]


def _beats(cand: Sequence[float], ref: Sequence[float]) -> str:
    """The verdict of :func:`attndenoise.stats.seed_verdict` (every seed beyond every baseline seed) as a cell."""
    outcome, diff = seed_verdict(cand, ref)
    lo, hi = (min(cand), max(cand)) if cand else (float("nan"), float("nan"))
    rlo, rhi = (min(ref), max(ref)) if ref else (float("nan"), float("nan"))
    span = f"seeds {lo:.3f}-{hi:.3f} vs {rlo:.3f}-{rhi:.3f}"
    if outcome == "one seed":
        return f"{diff:+.3f} (1 seed: no spread; run --seeds 3)"
    if outcome == "better":
        return f"**yes** ({diff:+.3f}; {span})"
    if outcome == "worse":
        return f"no, worse ({diff:+.3f}; {span})"
    return f"within spread ({diff:+.3f}; {span})"


def _train_noise_text(cfg: DemoConfig) -> str:
    if cfg.train_noise_mix is None:
        return str(cfg.train_noise)
    return "drawn per example from {" + ", ".join(str(r) for r in cfg.train_noise_mix) + "}"


def _lr_overrides_text(cfg: DemoConfig) -> str:
    if not cfg.learning_rates:
        return ""
    known = trainable_methods()
    rates = ", ".join(f"{k}{' parameters in every ' + k + ' row' if k in known else ''}: {v}"
                      for k, v in sorted(cfg.learning_rates.items()))
    return f" ({rates}; within a protocol the projections and LoRA train at the baseline's rate)"


def _gold_share(gold: Sequence[float], noise: Sequence[float]) -> str:
    """gold / (gold + distractors) per seed, formatted; "n/a (signed map)" when any mass is negative."""
    if min(*gold, *noise) < 0:
        return "n/a (signed map)"
    return _fmt([g / (g + n) if g + n else float("nan") for g, n in zip(gold, noise, strict=True)])


def _inference_text(cfg: DemoConfig) -> str:
    parts = [m + (" with " + ", ".join(f"{k}={v}" for k, v in sorted(cfg.method_options.get(m, {}).items()))
                  if cfg.method_options.get(m) else " with its defaults") for m in inference_methods()]
    return (" Inference-only methods run on the base model: " + "; ".join(parts) + ".") if parts else ""


def _options_text(cfg: DemoConfig) -> str:
    rows = cfg.trained_rows()
    methods = {parse_row(r).method for r in rows}
    used = {k: o for k, o in sorted(cfg.method_options.items()) if o and (k in methods or k in rows)}
    if not used:
        return ""
    parts = [m + " " + ", ".join(f"{k}={v}" for k, v in sorted(o.items())) for m, o in used.items()]
    return ("; method options (chosen on a validation split with the method trained alone; an option named by "
            "method applies to every row of that method): " + "; ".join(parts))


def verdict_pairs(labels: Sequence[str]) -> list[tuple[str, str]]:
    """``(row, baseline)`` for every row of ``labels`` whose own protocol's baseline (:func:`baseline_of`) is among
    them too, in ``labels`` order: ``<m>+attn`` with ``none``, ``<m>+lora`` with ``lora``, ``<m>`` with
    ``lora~<m>``, an inference-only method with the base. Rows are never compared across protocols."""
    present = set(labels)
    return [(lab, b) for lab in labels if (b := baseline_of(lab)) is not None and b in present]


def _params_text(params: dict[str, int], label: str) -> str:
    n = params.get(label)
    return "?" if n is None else f"{n:,}"


def _verdict_table(by: dict[str, list[EvalResults]], ratios: Sequence[float], rows: Sequence[tuple[str, str]],
                   params: dict[str, int] | None = None) -> list[str]:
    """One line per (row, reference) pair at every noise ratio >= 0.8 (:func:`_beats`), with each row's protocol and
    trainable-parameter count and its reference's."""
    params = params or {}
    high = [r for r in ratios if r >= 0.8]
    lines = ["| row | protocol | trainable params | compared with | its params | "
             + " | ".join(f"noise {r}" for r in high) + " |", "|---|---|---|---|---|" + "---|" * len(high)]
    for label, ref_label in rows:
        if label not in by or ref_label not in by:
            continue
        cells = [_beats(_qa(by[label], r, "exact_match"), _qa(by[ref_label], r, "exact_match")) for r in high]
        lines.append(f"| {label} | {protocol_of(label)} | {_params_text(params, label)} | {ref_label} | "
                     f"{_params_text(params, ref_label)} | " + " | ".join(cells) + " |")
    return lines


def _verdict_summary(by: dict[str, list[EvalResults]], ratios: Sequence[float],
                     rows: Sequence[tuple[str, str]]) -> str:
    high = [r for r in ratios if r >= 0.8]
    better: list[str] = []
    worse: list[str] = []
    judged = False
    for label, ref in rows:
        if label not in by or ref not in by:
            continue
        for r in high:
            cand, base = _qa(by[label], r, "exact_match"), _qa(by[ref], r, "exact_match")
            judged |= len(cand) > 1 and len(base) > 1
            v = _beats(cand, base)
            if v.startswith("**yes**"):
                better.append(f"{label} at {r}")
            elif v.startswith("no, worse"):
                worse.append(f"{label} at {r}")
    if not judged:
        return "One seed: there is no spread to judge by (run `--seeds 3`)."
    return ("Beyond the seed spread, better than its own protocol's baseline: " + (", ".join(better) or "none")
            + "; worse: " + (", ".join(worse) or "none") + ".")


def _needle_means(rs: Sequence[EvalResults]) -> list[float]:
    return [statistics.fmean(c.exact_match for c in r.needle) for r in rs if r.needle]


def render_report(cfg: DemoConfig, results: Sequence[EvalResults], attention: dict[str, list[AttentionMeasures]],
                  train_seconds: dict[str, list[float]], plots: dict[str, Path], total: float, *,
                  base_seconds: float | None = None, reused: int = 0, params: dict[str, int] | None = None,
                  ranks: dict[str, int] | None = None, load_average: float | None = None) -> str:
    """``report.md``: settings, QA accuracy per noise ratio with each row's protocol, trainable parameters and needle
    score (forgetting), within-protocol verdicts, attention to gold, timings."""
    by = _by_label(results)
    params = params or {}
    labels = cfg.labels()
    lines = [*_settings_section(cfg, total, base_seconds, reused, load_average),
             *_protocols_section(cfg, ranks or {}),
             *_qa_section(cfg, by, labels, params),
             f"![accuracy per protocol]({plots['protocols'].name})", "",
             *_verdict_sections(cfg, by, labels, params),
             *_attention_section(cfg, attention, labels, plots),
             *_timing_section(train_seconds)]
    return "\n".join(lines)


def _settings_section(cfg: DemoConfig, total: float, base_seconds: float | None, reused: int,
                      load_average: float | None) -> list[str]:
    return [
        "# attndenoise demo report",
        "",
        f"Embedded tiny model, {cfg.seeds} seed(s); values are the mean"
        + (" ± sample std across seeds" if cfg.seeds > 1 else "") + ".",
        f"Training: {cfg.steps} steps x {cfg.batch_size} examples at noise {_train_noise_text(cfg)}, learning rate "
        f"{cfg.learning_rate}{_lr_overrides_text(cfg)}, the same data and budget for every trained row"
        f"{_options_text(cfg)}. "
        f"Evaluation: {cfg.n_eval} held-out "
        "questions per noise ratio (the same for every row of a seed), greedy decoding." + _inference_text(cfg),
        f"Total time {total:.0f} s on {os.cpu_count()} CPU core(s), torch {torch.__version__} with "
        f"{cfg.threads or torch.get_num_threads()} thread(s)"
        + ("" if base_seconds is None else f", of which {base_seconds:.0f} s to build or load the base model")
        + ("" if load_average is None else f"; load average {load_average:.2f} at the end")
        + (f"; {reused} finished training run(s) were reused from an earlier invocation." if reused else "."),
        "",
    ]


def _protocols_section(cfg: DemoConfig, ranks: dict[str, int]) -> list[str]:
    rows_text = ("every method in every protocol (`--all-protocols`)" if cfg.all_protocols
                 else "each method in the protocol its paper used (`--all-protocols` runs every method in every one)")
    matched_text = "".join(f"; `{lab}` has rank {r}" for lab, r in ranks.items())
    return [
        "## Protocols",
        "",
        f"Rows: {rows_text}, and the baselines. Each row is compared only with its own protocol's baseline, trained "
        "on the same data, steps and seeds:",
        "",
        "- `attention`: `<method>+attn`, the method and the attention projections (q/k/v/o) train together (the DAA "
        "paper's protocol); baseline `none`, the projections alone;",
        "- `lora`: `<method>+lora`, the method trains beside a LoRA (as OpAmp trains with QLoRA); baseline `lora`;",
        "- `alone`: `<method>`, only the method's own parameters train; baseline `lora~<method>`, a LoRA whose rank "
        f"gives about the same trainable-parameter count{matched_text};",
        "- `inference`: the base and SRA (no training); SRA is compared with the base.",
        "",
    ]


def _qa_section(cfg: DemoConfig, by: dict[str, list[EvalResults]], labels: Sequence[str],
                params: dict[str, int]) -> list[str]:
    ratios = list(cfg.eval_noise)
    top = max(ratios)
    lines = [
        "## Noisy-context QA, exact match",
        "",
        f"Needle: pass-key retrieval exact match, mean over the grid of {list(cfg.context_lengths)} tokens x depths "
        f"{list(cfg.depths)} ({cfg.needle_n} needles per cell). The training data (synthetic QA) has no pass-key "
        "examples, so a row's needle score below the base's is what its training made the model forget: the "
        "forgetting column.",
        "",
        "| row | protocol | trainable params | " + " | ".join(f"noise {r}" for r in ratios)
        + f" | F1 @ {top} | lenient @ {top} | needle (forgetting) |",
        "|---|---|---|" + "---|" * (len(ratios) + 3),
    ]
    for label in labels:
        rs = by.get(label, [])
        if not rs:
            continue
        cells = [_fmt(_qa(rs, r, "exact_match")) for r in ratios]
        needle = _needle_means(rs)
        lines.append(f"| {label} | {protocol_of(label)} | {_params_text(params, label)} | " + " | ".join(cells)
                     + f" | {_fmt(_qa(rs, top, 'f1'))} | {_fmt(_qa(rs, top, 'lenient'))} | "
                     + (_fmt(needle) if needle else "-") + " |")
    return [*lines, ""]


def _verdict_sections(cfg: DemoConfig, by: dict[str, list[EvalResults]], labels: Sequence[str],
                      params: dict[str, int]) -> list[str]:
    ratios = list(cfg.eval_noise)
    pairs = verdict_pairs([lab for lab in labels if lab in by])
    lines = ["## Does a method beat its own protocol's baseline at noise >= 0.8?", "",
             "A row beats its baseline when every seed of it scores above every seed of the baseline (exact match; "
             "the seeds' ranges are given); `no, worse` when every seed scores below. Every row is compared "
             "within its protocol only (same data, steps and seeds); SRA (inference only) with the base model it "
             "runs on.", ""]
    lines += _verdict_table(by, ratios, pairs, params)
    lines += ["", _verdict_summary(by, ratios, pairs), "",
              "## Does training help at all? Every trained row against the base model", "",
              "The same rule against the untouched base model: `yes` means fine-tuning this row on noisy contexts "
              "made the model more robust than it was.", ""]
    trained = [lab for lab in labels if protocol_of(lab) != "inference"]
    return [*lines, *_verdict_table(by, ratios, [(lab, BASE_LABEL) for lab in trained], params), ""]


def _attention_section(cfg: DemoConfig, attention: dict[str, list[AttentionMeasures]], labels: Sequence[str],
                       plots: dict[str, Path]) -> list[str]:
    lines = ["## Forgetting: needle retrieval of the base model", "",
             "The needle column above; the base model's grid (every trained row is measured on the same grid):", "",
             f"![needle]({plots['needle_base'].name})", "",
             f"## Attention to the gold document, noise {cfg.attention_noise}", "",
             "Mass of each model's effective combined attention map (signed for differential methods) from the last "
             "prompt position on the gold document's tokens vs on the distractors' tokens, mean over heads, layers "
             f"and {cfg.attention_examples} examples. The gold share is given for maps without negative mass only: "
             "a signed map can put negative mass on the distractors, and the ratio then means nothing; compare the "
             "margin (gold minus distractors) instead.", "",
             "| row | to gold | to distractors | gold - distractors | gold / (gold + distractors) |",
             "|---|---|---|---|---|"]
    for label in labels:
        if label not in attention:
            continue
        gold = [statistics.fmean(m.gold) for m in attention[label]]
        noise = [statistics.fmean(m.noise) for m in attention[label]]
        margin = [g - n for g, n in zip(gold, noise, strict=True)]
        lines.append(f"| {label} | {_fmt(gold)} | {_fmt(noise)} | {_fmt(margin)} | {_gold_share(gold, noise)} |")
    return [*lines, "", f"![attention]({plots['attention'].name})", ""]


def _timing_section(train_seconds: dict[str, list[float]]) -> list[str]:
    lines = ["## Training time (s per run, the training loop as recorded in run.json)", "",
             "| row | seconds |", "|---|---|"]
    return lines + [f"| {label} | {_fmt(secs, 1)} |" for label, secs in train_seconds.items()]


__all__ = ["DemoConfig", "run_demo", "render_report", "trainable_methods", "inference_methods", "paper_row",
           "protocol_of", "baseline_of", "verdict_pairs", "matched_lora_rank", "train_config", "plot_protocols",
           "PROTOCOLS"]
