"""``attndenoise study``: each method in its paper's training protocol against that protocol's baseline, on a real
model and multi-document QA data; report and plots (resumable)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from . import app
from .common import fail, int_list, one_line_warnings, user_errors

_err = Console(stderr=True)


@app.command("study")
def study_command(
    data: Annotated[Path, typer.Option(help="multi-document QA data (.jsonl / .jsonl.gz: question, answers, ctxs), "
                                            "e.g. NaturalQuestions-Open with its gold passages")],
    model: Annotated[str, typer.Option(help="tiny, smollm2-135m, a .gguf file, a model folder or a hub id")] = (
        "smollm2-135m"),
    out: Annotated[Path, typer.Option(help="output folder: report.md, results.json, plots, runs/, eval/")] = Path(
        "study-out"),
    rows: Annotated[str | None, typer.Option(
        help="comma-separated rows: none, lora, <method>+attn, <method>+lora, <method> (alone), lora~<method> "
             "(a LoRA of about the method's parameter count), or a named set: default (none, lora, daa+attn, "
             "diff+attn, dint+attn, opamp+lora: one method of each paper in its protocol), papers (every method "
             "in its paper's protocol), full (every method in every protocol)")] = None,
    full: Annotated[bool, typer.Option("--full", help="every method in every protocol, 3 seeds, all layers "
                                                      "(a GPU's worth of work)")] = False,
    seeds: Annotated[str, typer.Option(help="training seeds")] = "0,1",
    top_layers: Annotated[int | None, typer.Option(help="patch and train only the top k decoder layers (the frozen "
                                                        "layers below run once per prompt); 0: every layer. "
                                                        "Default 4, with --full 0")] = None,
    steps: Annotated[int, typer.Option(help="optimiser steps per training run")] = 150,
    batch_size: Annotated[int, typer.Option(help="examples per step")] = 1,
    train_distractors: Annotated[int, typer.Option(help="hard distractors per training question")] = 4,
    n: Annotated[int, typer.Option(help="test questions per setting (the first n of the fixed test split)")] = 32,
    positions: Annotated[str, typer.Option(help="gold positions measured with 9 hard distractors (first, middle, "
                                                "last); the 9 point of the curve is their mean")] = "first,middle,last",
    val_n: Annotated[int, typer.Option(help="validation questions for the learning-rate / schedule choice")] = 100,
    attention_n: Annotated[int, typer.Option(help="prompts for attention to gold (0: skip)")] = 16,
    needle_n: Annotated[int, typer.Option(help="pass-key examples per depth for the forgetting column (0: skip)")
                        ] = 6,
    threads: Annotated[int | None, typer.Option(help="CPU threads for torch (default: torch's choice)")] = None,
    dtype: Annotated[str, typer.Option(help="float32 or bfloat16")] = "float32",
) -> None:
    """Train each differential-attention method in its paper's protocol and compare it with that protocol's own
    baseline (same data, steps, seeds, trained layers): best-subspan EM against 0 / 4 / 9 / 19 hard distractors,
    the gold passage's position, attention to gold, pass-key retrieval. Learning rates and the lambda schedule are
    chosen on the validation split; the test split is read once. Rerun the same command to resume.

    Example: attndenoise study --data nq-open-oracle.jsonl.gz --out docs/real/study
    """
    from ..study import DEFAULT_ROWS, StudyConfig, StudyError, expand_rows, full_rows, run_study

    if dtype not in ("float32", "bfloat16"):
        fail(f"--dtype {dtype}: choose float32 or bfloat16")
    chosen_rows = expand_rows([r.strip() for r in rows.split(",") if r.strip()]) if rows else (
        full_rows() if full else DEFAULT_ROWS)
    seed_list = int_list(seeds, "--seeds")
    at9 = [p.strip() for p in positions.split(",") if p.strip()]
    bad = [p for p in at9 if p not in ("first", "middle", "last")]
    if bad or not at9:
        fail(f"--positions {positions}: give some of first, middle, last")
    settings = (("k0", 0, "random"), ("k4", 4, "random"), *((f"k9-{p}", 9, p) for p in at9), ("k19", 19, "random"))
    cfg = StudyConfig(
        data=str(data), out=str(out), model=model, rows=chosen_rows,
        seeds=(0, 1, 2) if full and seeds == "0,1" else seed_list,
        top_layers=(0 if full else 4) if top_layers is None else top_layers, steps=steps,
        batch_size=batch_size, train_distractors=train_distractors, n=n, val_n=val_n, attention_n=attention_n,
        needle_n=needle_n, threads=threads, dtype=dtype, settings=settings,
    )
    with user_errors(), one_line_warnings():
        try:
            cfg.validate()
            from ..models import resolve_model

            resolve_model(model)  # a bad --model fails now, before the data is read
            report = run_study(cfg, log=lambda m: _err.print(m, highlight=False))
        except StudyError as e:
            fail(str(e))
    Console().print(f"wrote {report}")
