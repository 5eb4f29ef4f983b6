"""``attndenoise train``: fine-tune a method (or a baseline) on noisy-context data; runs under ``torchrun`` as is."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from . import app

_err = Console(stderr=True)


def parse_sets(items: list[str]) -> dict[str, Any]:
    """``["anneal_steps=200", "layers=[0,1]", "where=pre_rope"]`` -> typed values (JSON where it parses, else text)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise typer.BadParameter(f"{item!r}: expected key=value (e.g. anneal_steps=200)", param_hint="--set")
        try:
            value: Any = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        out[key.strip()] = value
    return out


@app.command("train")
def train_command(
    method: Annotated[str, typer.Option(
        "--method", help="Method to train (see `attndenoise methods`), or a baseline: 'none' fine-tunes the "
        "attention projections q/k/v/o only, 'lora' trains a LoRA on them.")],
    out: Annotated[Path, typer.Option("--out", help="Output directory: adapter, run.json, checkpoints.")],
    model: Annotated[str, typer.Option("--model", help="Base causal LM: 'tiny' (the embedded model), 'smollm2-135m', "
                                       "a .gguf file, a local model folder or a hub id.")] = "tiny",
    data: Annotated[str, typer.Option(
        "--data", help="Training data: a .jsonl/.json/.csv/.parquet file or a datasets folder "
        "(records with documents/gold/question/answer, or chat messages), or 'synthetic' for the embedded task.")]
    = "synthetic",
    noise: Annotated[float | None, typer.Option(
        "--noise", help="Noise ratio r in [0, 1): each context gets round(1/(1-r))-1 distractors per gold document "
        "(the example's own first, then other examples'). Default: file data as given; 0.8 for synthetic.")] = None,
    steps: Annotated[int, typer.Option("--steps", help="Optimiser steps (the same budget for every method).")] = 100,
    lr: Annotated[float, typer.Option("--lr", help="Peak learning rate (linear decay).")] = 1e-3,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Examples per process per micro-batch.")] = 4,
    grad_accum: Annotated[int, typer.Option("--grad-accum", help="Micro-batches accumulated per step.")] = 1,
    max_length: Annotated[int, typer.Option(
        "--max-length", help="Maximum tokens per example; longer ones lose distractors farthest from the gold "
        "first, and are skipped if even the gold documents do not fit.")] = 512,
    seed: Annotated[int, typer.Option("--seed", help="Seed for data order, noise and initialisation.")] = 0,
    save_steps: Annotated[int, typer.Option("--save-steps", help="Write a checkpoint every N steps.")] = 50,
    resume: Annotated[bool, typer.Option(
        "--resume", help="Continue from the last complete checkpoint in --out (start fresh if there is none).")]
    = False,
    lora: Annotated[bool, typer.Option("--lora", help="Stack a LoRA on the attention projections under the "
                                                      "method; both train.")] = False,
    lora_rank: Annotated[int, typer.Option("--lora-rank", help="LoRA rank r.")] = 8,
    lora_alpha: Annotated[int, typer.Option("--lora-alpha", help="LoRA alpha (scale alpha/r).")] = 16,
    qlora: Annotated[bool, typer.Option(
        "--qlora", help="LoRA over a 4-bit base model (needs CUDA and bitsandbytes).")] = False,
    synthetic_examples: Annotated[int, typer.Option(
        "--synthetic-examples", help="How many examples --data synthetic generates.")] = 1000,
    set_: Annotated[list[str] | None, typer.Option(
        "--set", help="A field of the method's config, key=value (repeatable), e.g. --set anneal_steps=200 "
        "--set layers=[0,1]. Values are read as JSON when they parse, else as text.")] = None,
    logging_steps: Annotated[int, typer.Option(
        "--logging-steps", help="Log loss and lambda per layer every N steps (kept in run.json).")] = 10,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show a progress bar.")] = True,
) -> None:
    """Train a method (or the 'none' / 'lora' baseline) and write its adapter and run.json to --out.

    Under `torchrun --nproc_per_node N` the same command trains data-parallel (global batch = N x batch size x grad
    accum); only the first process writes files.
    """
    from ..config import ConfigError
    from ..data import DataFormatError
    from ..io import AdapterLoadError
    from ..train import TrainConfig, TrainError, train

    try:
        config = TrainConfig(
            model=model, method=method, data=data, out=str(out), method_options=parse_sets(set_ or []),
            noise=noise, steps=steps, learning_rate=lr, batch_size=batch_size, grad_accum=grad_accum,
            max_length=max_length, seed=seed, save_steps=save_steps, resume=resume, lora=lora, lora_rank=lora_rank,
            lora_alpha=lora_alpha, qlora=qlora, synthetic_examples=synthetic_examples, progress=progress,
            logging_steps=logging_steps,
        )
        result = train(config)
    except (ConfigError, TrainError, DataFormatError, AdapterLoadError, FileNotFoundError) as e:
        _err.print(f"[red]error:[/red] {e}", highlight=False, markup=True)
        raise typer.Exit(2) from None
    run = result.run
    losses = run["loss_history"]
    if losses and result.main_process:
        Console(soft_wrap=True).print(
            f"trained {run['kind']} ({run['method']}) for {run['steps']} steps in {run['seconds']:.1f} s: "
            f"loss {losses[0]['loss']:.4f} -> {losses[-1]['loss']:.4f}; wrote {result.out_dir}", highlight=False,
        )
