"""``attndenoise robustness``: how retrieval noise hurts a model on multi-document QA; report and plots (resumable)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from . import app
from .common import fail, int_list, user_errors

_err = Console(stderr=True)


def _positions(text: str) -> tuple[str | int, ...]:
    return tuple(int(p) if p.strip().lstrip("-").isdigit() else p.strip() for p in text.split(",") if p.strip())


@app.command("robustness")
def robustness_command(
    data: Annotated[Path, typer.Option(help="multi-document QA data (.jsonl / .jsonl.gz: question, answers, ctxs), "
                                            "e.g. NaturalQuestions-Open with its gold passages")],
    model: Annotated[str, typer.Option(help="tiny, smollm2-135m, a .gguf file, a model folder or a hub id")] = (
        "smollm2-135m"),
    out: Annotated[Path, typer.Option(help="output folder: report.md, results.json, plots, parts/")] = Path(
        "robustness-out"),
    n: Annotated[int, typer.Option(help="test questions per setting (the first n of the fixed test split)")] = 40,
    distractors: Annotated[str, typer.Option(help="distractor counts of the accuracy curve")] = "0,4,9,19",
    kinds: Annotated[str, typer.Option(help="distractor kinds: random, hard (BM25, answer-free)")] = "random,hard",
    position_distractors: Annotated[int, typer.Option(help="distractors of the gold-position curve")] = 9,
    positions: Annotated[str, typer.Option(help="gold positions: first, middle, last or 0-based indices")] = (
        "first,middle,last"),
    attention_n: Annotated[int, typer.Option(help="examples for attention to gold per layer (0: skip)")] = 8,
    sra: Annotated[bool, typer.Option("--sra/--no-sra", help="also measure SRA (settings chosen on validation)")] = (
        True),
    sra_val_n: Annotated[int, typer.Option(help="validation questions per SRA setting")] = 24,
    seed: Annotated[int, typer.Option(help="seed of distractor draws and gold positions")] = 0,
    batch_size: Annotated[int, typer.Option(help="generation batch size")] = 4,
    threads: Annotated[int | None, typer.Option(help="CPU threads for torch (default: torch's choice)")] = None,
    dtype: Annotated[str, typer.Option(help="float32 or bfloat16")] = "float32",
) -> None:
    """Measure how retrieval noise hurts a model: best-subspan EM against the number of random and hard (BM25)
    distractor passages, against the gold passage's position, attention to the gold passage per layer, and SRA.

    Example: attndenoise robustness --data nq-open-oracle.jsonl.gz --model smollm2-135m --out docs/real
    """
    from ..robustness import RobustnessConfig, RobustnessError, run_robustness

    kind_list = tuple(k.strip() for k in kinds.split(",") if k.strip())
    cfg = RobustnessConfig(
        data=str(data), model=model, out=str(out), n=n, distractors=int_list(distractors, "--distractors"),
        kinds=kind_list, position_distractors=position_distractors, positions=_positions(positions),  # type: ignore[arg-type]
        attention_n=attention_n, sra=sra, sra_val_n=sra_val_n, seed=seed, batch_size=batch_size, threads=threads,
        dtype=dtype,
    )
    with user_errors():  # the library's user errors (data, model, config) in one line, exit 2
        try:
            cfg.validate()
            from ..models import resolve_model

            resolve_model(model)  # a bad --model fails now, before the data is read
            report = run_robustness(cfg, _err)
        except RobustnessError as e:
            fail(str(e))
    Console().print(f"wrote {report}")
