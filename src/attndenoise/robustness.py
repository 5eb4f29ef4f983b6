"""How much retrieval noise hurts a real model: the measurements behind ``attndenoise robustness`` (and docs/real/).

On multi-document QA data in the format of "Lost in the Middle" (Liu et al., TACL 2024, arXiv:2307.03172), e.g.
NaturalQuestions-Open with its gold passages, a model is asked each question of a fixed split with its gold passage
among ``k`` distractor passages, and scored by best-subspan exact match (:func:`attndenoise.evaluate.best_subspan_em`)
with EM and F1 beside it:

* **accuracy vs noise**: ``k`` in ``distractors`` (default 0, 4, 9, 19), distractors ``random`` (any other
  question's passage) and ``hard`` (BM25's best passages for the question that hold no answer: what a retriever
  returns), the gold passage at a seeded random position; a 95% Wilson interval on every number;
* **position**: ``position_distractors`` hard distractors with the gold first, in the middle, last;
* **attention to gold per layer** (the share of the answer position's attention, summed over the gold passage's
  tokens, mean over heads), on the first ``attention_n`` examples of the hard setting with ``position_distractors``;
* **SRA** (Scaled ReAttention, inference only): the authors' constants and a small grid, chosen on the
  validation split by best-subspan EM; the test split gets the base, the authors' constants and the chosen ones.

Every part is written to ``out/parts/<part>.json`` with a key of the settings it depends on, so a rerun (or a run
after an interruption) reuses finished parts; ``report.md``, ``results.json`` and the plots are rewritten from the
parts at the end. Progress and an ETA are printed while it runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .data.examples import NoisyExample
from .data.retrieval import (
    LITM_FORMAT,
    MultiDocRecord,
    PassagePool,
    multidoc_examples,
    read_multidoc_qa,
    split_records,
)
from .stats import wilson_interval

#: SRA settings tried on the validation split; the first is the authors' (``init_sra``) and wins ties.
AUTHORS_SRA: dict[str, Any] = {"b": 100, "t": 200, "alpha_inter": 0.5, "alpha_outer": 0.3,
                               "strengthen_inter": 4.0, "strengthen_outer": 4.0}
SRA_GRID: tuple[dict[str, Any], ...] = (
    AUTHORS_SRA,
    # the authors' demonstration constants
    {"b": 5, "t": 50, "alpha_inter": 0.5, "alpha_outer": 0.5, "strengthen_inter": 5.0, "strengthen_outer": 5.0},
    # a protected span the size of the instruction and a question-sized tail, milder edits
    {"b": 40, "t": 40, "alpha_inter": 0.25, "alpha_outer": 0.25, "strengthen_inter": 2.0, "strengthen_outer": 2.0},
)


class RobustnessError(ValueError):
    """A bad setting of the robustness run (the message names it and what is accepted)."""


@dataclass
class RobustnessConfig:
    """Everything that determines the measurements (all of it is recorded in results.json)."""

    data: str
    model: str = "smollm2-135m"
    out: str = "docs/real"
    n: int = 40  # test questions per setting (the first n of the test split)
    distractors: tuple[int, ...] = (0, 4, 9, 19)
    kinds: tuple[str, ...] = ("random", "hard")
    position_distractors: int = 9
    positions: tuple[str, ...] = ("first", "middle", "last")
    attention_n: int = 8
    sra: bool = True
    sra_grid: tuple[dict[str, Any], ...] = SRA_GRID
    sra_val_n: int = 24  # validation questions per SRA setting
    sra_distractors: tuple[int, ...] = (9,)
    seed: int = 0
    batch_size: int = 4
    max_new_tokens: int = 32
    threads: int | None = None
    dtype: str = "float32"

    def validate(self) -> None:
        for name in ("n", "batch_size", "max_new_tokens", "sra_val_n"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise RobustnessError(f"{name}={v!r}: must be an integer >= 1")
        if self.attention_n < 0 or self.threads is not None and self.threads < 1:
            raise RobustnessError("attention_n must be >= 0 and threads >= 1")
        bad = [k for k in (*self.distractors, self.position_distractors, *self.sra_distractors) if k < 0]
        if bad or not self.distractors:
            raise RobustnessError(f"distractor counts must be integers >= 0, got {list(self.distractors)}")
        unknown = [k for k in self.kinds if k not in ("random", "hard")]
        if unknown or not self.kinds:
            raise RobustnessError(f"unknown distractor kind(s) {unknown}; accepted: random, hard")
        for p in self.positions:
            index_ok = isinstance(p, int) and 0 <= p <= self.position_distractors
            if p not in ("first", "middle", "last") and not index_ok:
                raise RobustnessError(f"gold position {p!r}; accepted: first, middle, last or an index "
                                      f"0..{self.position_distractors}")
        if self.dtype not in ("float32", "bfloat16"):
            raise RobustnessError(f"dtype={self.dtype!r}; accepted: float32, bfloat16")
        if not Path(self.data).is_file():
            raise RobustnessError(f"no such data file: {self.data} (a .jsonl or .jsonl.gz of question/answers/ctxs)")


# -- parts ------------------------------------------------------------------------------------------------------


@dataclass
class Part:
    """One unit of work: a name, the settings it depends on, its cost estimate (for the ETA) and how to run it."""

    name: str
    settings: dict[str, Any]
    cost: float
    run: Callable[[Callable[[float], None]], dict[str, Any]]

    def key(self) -> str:
        return hashlib.sha256(json.dumps(self.settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _read_part(path: Path, key: str) -> dict[str, Any] | None:
    try:
        saved = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return saved if saved.get("key") == key else None


def _write_json(path: Path, obj: Any) -> None:
    from .io import atomic_write_json

    atomic_write_json(path, obj)


class Runner:
    """Loads the model once and runs the parts (skipping finished ones), with one progress bar and ETA."""

    def __init__(self, cfg: RobustnessConfig, console: Any) -> None:
        self.cfg = cfg
        self.console = console
        self.out = Path(cfg.out)
        self._model: Any = None
        self._tokenizer: Any = None
        self.records = read_multidoc_qa(cfg.data)
        try:
            self.test = split_records(self.records, "test")[: cfg.n]
            self.val = split_records(self.records, "validation")[: cfg.sra_val_n]
        except ValueError as e:  # too few records for the fixed split
            raise RobustnessError(f"{cfg.data}: {e}") from None
        self.pool = PassagePool.from_records(self.records)
        self.model_seconds = 0.0

    # model -------------------------------------------------------------------------------------------------
    def model(self) -> tuple[Any, Any]:
        if self._model is None:
            import torch

            from .models import load_model_and_tokenizer

            start = time.perf_counter()
            dtype = torch.bfloat16 if self.cfg.dtype == "bfloat16" else torch.float32
            self._model, self._tokenizer = load_model_and_tokenizer(self.cfg.model, dtype=dtype)
            self.model_seconds = time.perf_counter() - start
        return self._model, self._tokenizer

    # building blocks ---------------------------------------------------------------------------------------
    def examples(self, records: Sequence[MultiDocRecord], k: int, kind: str, position: Any) -> list[NoisyExample]:
        return multidoc_examples(records, k, "hard" if k and kind == "hard" else "random", gold_position=position,
                                 seed=self.cfg.seed,
                                 pool=self.pool)

    def qa(self, examples: list[NoisyExample], advance: Callable[[float], None], weight: float,
           sra: dict[str, Any] | None = None) -> dict[str, Any]:
        from . import patch, registry
        from .evaluate import generate_answers, qa_result, score_predictions

        model, tok = self.model()
        if sra is not None:
            patch.apply(model, registry.config_for("sra", **sra))
        answers: list[tuple[str, int]] = []
        tokens: list[int] = []
        start = time.perf_counter()
        try:
            for i in range(0, len(examples), self.cfg.batch_size):
                chunk = examples[i:i + self.cfg.batch_size]
                answers += generate_answers(model, tok, chunk, batch_size=self.cfg.batch_size,
                                            max_new_tokens=self.cfg.max_new_tokens, fmt=LITM_FORMAT)
                advance(weight * len(chunk))
        finally:
            if sra is not None:
                patch.remove(model)
        from .data.formatting import encode_for_training

        tokens = [encode_for_training(ex, tok, fmt=LITM_FORMAT).prompt_length for ex in examples]
        res = qa_result(None, score_predictions(examples, answers))
        d = asdict(res)
        d["seconds"] = time.perf_counter() - start
        d["mean_prompt_tokens"] = sum(tokens) / len(tokens)
        d["ci_best_subspan_em"] = wilson_interval(sum(p.best_subspan_em or 0.0 for p in res.predictions), res.n)
        return d

    def attention(self, examples: list[NoisyExample], advance: Callable[[float], None], weight: float
                  ) -> dict[str, Any]:
        from .measures import example_attention

        model, tok = self.model()
        start = time.perf_counter()
        per, uniform = [], []
        for ex in examples:
            m, _, enc = example_attention(model, tok, ex, query="last", fmt=LITM_FORMAT)
            per.append(m)
            # What attention spread evenly over the prompt would give the gold passage: the reference line.
            uniform.append(sum(e - s for s, e in enc.gold_spans) / enc.prompt_length)
            advance(weight)
        layers = per[0].layers
        gold = [sum(p.gold[i] for p in per) / len(per) for i in range(len(layers))]
        noise = [sum(p.noise[i] for p in per) / len(per) for i in range(len(layers))]
        return {"layers": layers, "gold": gold, "noise": noise, "n": len(per), "uniform_gold": sum(uniform) / len(per),
                "per_example_gold": [p.gold for p in per], "seconds": time.perf_counter() - start}

    # the plan ----------------------------------------------------------------------------------------------
    def parts(self) -> list[Part]:
        cfg = self.cfg
        common = self._common()
        out: list[Part] = []

        for k in cfg.distractors:
            for kind in (("none",) if k == 0 else cfg.kinds):
                out.append(self._qa_part_for(f"curve-{kind}-{k}", self.test, k, kind if k else "random", "random",
                                                None))
        k9 = cfg.position_distractors
        for pos in cfg.positions:
            out.append(self._qa_part_for(f"position-hard-{k9}-{pos}", self.test, k9, "hard", pos, None))
        if cfg.attention_n:
            recs = self.test[: cfg.attention_n]
            weight = 2.0 * (k9 + 3)  # eager maps cost about two plain forwards

            def run_attention(advance: Callable[[float], None]) -> dict[str, Any]:
                return self.attention(self.examples(recs, k9, "hard", "random"), advance, weight)

            out.append(Part(f"attention-hard-{k9}", {**common, "questions": [r.question for r in recs], "k": k9},
                            weight * len(recs), run_attention))
        if cfg.sra:
            for i, opts in enumerate(cfg.sra_grid):
                out.append(self._qa_part_for(f"sra-val-{i}", self.val, k9, "hard", "random", sra=opts))
            out.append(self._qa_part_for(f"val-base-hard-{k9}", self.val, k9, "hard", "random", None))
        return out

    def sra_test_parts(self, chosen: dict[str, Any]) -> list[Part]:
        """The test-split SRA rows, known once validation has chosen: the authors' constants and the chosen ones."""
        parts = []
        settings = [AUTHORS_SRA] if chosen == AUTHORS_SRA else [AUTHORS_SRA, chosen]
        for k in self.cfg.sra_distractors:
            for j, opts in enumerate(settings):
                tag = "authors" if j == 0 else "chosen"
                part = self._qa_part_for(f"sra-test-{tag}-hard-{k}", self.test, k, "hard", "random", opts)
                parts.append(part)
        return parts

    def _common(self) -> dict[str, Any]:
        """Settings every part depends on (a change of any of them re-runs the part)."""
        cfg = self.cfg
        return {"data": str(Path(cfg.data).resolve()), "model": cfg.model, "seed": cfg.seed, "dtype": cfg.dtype,
                "max_new_tokens": cfg.max_new_tokens, "version": 1}

    def _qa_part_for(self, name: str, records: Sequence[MultiDocRecord], k: int, kind: str, position: Any,
                     sra: dict[str, Any] | None) -> Part:
        settings = {**self._common(), "questions": [r.question for r in records], "k": k, "kind": kind,
                    "position": position, "sra": sra}
        weight = k + 3.0

        def run(advance: Callable[[float], None]) -> dict[str, Any]:
            return {"k": k, "kind": kind, "position": position, "sra": sra,
                    **self.qa(self.examples(records, k, kind, position), advance, weight, sra)}

        return Part(name, settings, weight * len(records), run)

    def execute(self, parts: list[Part], progress: Any, task: Any) -> dict[str, dict[str, Any]]:
        results: dict[str, dict[str, Any]] = {}
        for part in parts:
            path = self.out / "parts" / f"{part.name}.json"
            saved = _read_part(path, part.key())
            if saved is not None:
                results[part.name] = {**saved["result"], "reused": True}
                progress.advance(task, part.cost)
                continue
            progress.update(task, description=part.name)
            result = part.run(lambda w: progress.advance(task, w))
            _write_json(path, {"key": part.key(), "settings": part.settings, "result": result})
            results[part.name] = result
            if not self.console.is_terminal:  # a log file gets no live bar: one line per finished part instead
                t = progress.tasks[0]
                eta = f"{t.time_remaining / 60:.0f} min" if t.time_remaining is not None else "?"
                self.console.print(f"{part.name} done in {result.get('seconds', 0):.0f} s "
                                   f"({100 * t.completed / t.total:.0f}% of the estimated work, ETA {eta})",
                                   highlight=False)
        return results


def choose_sra(results: dict[str, dict[str, Any]], grid: Sequence[dict[str, Any]]) -> tuple[dict[str, Any], int]:
    """The SRA setting with the best validation best-subspan EM (the earliest wins ties: the authors' first)."""
    scores = [results[f"sra-val-{i}"]["best_subspan_em"] for i in range(len(grid))]
    best = max(range(len(grid)), key=lambda i: (scores[i], -i))
    return dict(grid[best]), best


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    threads = torch.get_num_threads()
    return f"{cpu}, {threads} thread{'' if threads == 1 else 's'}, torch {torch.__version__}"


def run_robustness(cfg: RobustnessConfig, console: Any = None) -> Path:
    """Run (or resume) every part, then write ``report.md``, ``results.json`` and the plots into ``cfg.out``."""
    import torch
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    cfg.validate()
    console = console or Console(stderr=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    wall = time.perf_counter()
    runner = Runner(cfg, console)
    parts = runner.parts()
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
               TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn())
    # The SRA test rows are known only after validation; their cost enters the estimate up front.
    sra_cost = (2 * sum(k + 3.0 for k in cfg.sra_distractors) * len(runner.test)) if cfg.sra else 0.0
    with Progress(*columns, console=console, transient=False, disable=not console.is_terminal) as progress:
        task = progress.add_task("robustness", total=sum(p.cost for p in parts) + sra_cost)
        results = runner.execute(parts, progress, task)
        chosen: dict[str, Any] | None = None
        if cfg.sra:
            chosen, _ = choose_sra(results, cfg.sra_grid)
            sra_parts = runner.sra_test_parts(chosen)
            progress.update(task, total=sum(p.cost for p in parts) + sum(p.cost for p in sra_parts))
            results.update(runner.execute(sra_parts, progress, task))
    seconds = time.perf_counter() - wall
    from .robustness_report import write_report

    meta = {"config": {**asdict(cfg), "sra_grid": list(cfg.sra_grid)}, "machine": machine(),
            "wall_seconds": seconds, "model_load_seconds": runner.model_seconds,
            "test_questions": len(runner.test), "validation_questions": len(runner.val),
            "parts_seconds": sum(float(r.get("seconds", 0.0)) for r in results.values()),
            "load_average": os.getloadavg()[0], "sra_chosen": chosen,
            "split_sizes": [len(split_records(runner.records, s)) for s in ("train", "validation", "test")]}
    return write_report(Path(cfg.out), results, meta)


__all__ = ["RobustnessConfig", "RobustnessError", "run_robustness", "wilson_interval", "choose_sra", "AUTHORS_SRA",
           "SRA_GRID"]
