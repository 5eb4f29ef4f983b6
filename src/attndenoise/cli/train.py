"""``attndenoise train``: fine-tune a method (or a baseline) on noisy-context data; runs under ``torchrun`` as is."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from . import app
from .common import fail, numbers, one_line_warnings, parse_sets, read_json_file, set_threads, user_errors

__all__ = ["parse_sets", "read_config_file", "train_command"]

# CLI parameters whose TrainConfig field has another name; parameters not in TrainConfig are not listed.
_FIELD = {"lr": "learning_rate", "set_": "method_options"}
_NOT_CONFIG = ("config_file", "threads", "ctx")


def lambda_note(config: Any) -> str | None:
    """A one-line note when the run's settings are the ones known to leave lambda near zero, naming the fix: a
    method with the literal ``"paper"`` schedule ends at the barely trained ``lambda_learn``, so the trained model
    computes (nearly) the base model. Measured on the tiny model (validation split, 100 questions, EM at noise
    0.8 / 0.9): base 0.98 / 0.65; ``train --method daa --steps 100`` (paper, lr 1e-3, 4 per step) 0.98 / 0.65, the base
    exactly; the same with ``lambda_schedule=linear`` at lr 3e-4 0.14 / 0.06 (a full-strength differential needs more
    training than 100 x 4 examples); see the README for the demo's budget. ``None`` when the note does not apply
    (baselines, methods without a lambda schedule, or attention / LoRA weights training with the method)."""
    if config.kind != "method":
        return None
    cfg = config.method_config()
    if not getattr(cfg, "uses_lambda_schedule", False) or getattr(cfg, "lambda_schedule", None) != "paper":
        return None
    return (f"note: --method {config.method} with lambda_schedule=paper ends at the learned lambda, ~0 after a "
            "short run, so the result computes nearly the base model; for a differential effect use --set "
            f"lambda_schedule=linear with a larger budget ({LINEAR_BUDGET})")


# The demo's budget for lambda_schedule="linear": on the validation split it took daa from 0.65 to 0.765 at noise 0.9
# (DemoConfig's tuning notes, 200 questions).
LINEAR_BUDGET = "e.g. --steps 150 --batch-size 16 --lr 2e-3 --synthetic-examples 2400"


def read_config_file(path: Path) -> dict[str, Any]:
    """A ``--config`` file: a JSON object (or YAML when the file ends in .yaml/.yml and pyyaml is installed) of
    ``TrainConfig`` fields; unknown fields fail naming the accepted ones."""
    from ..train import TrainConfig

    if path.suffix.lower() in (".yaml", ".yml"):
        if not path.is_file():
            fail(f"--config {path}: no such file")
        try:
            import yaml
        except ImportError:
            fail(f"--config {path}: reading YAML needs pyyaml (pip install pyyaml); or give the settings as JSON")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            fail(f"--config {path}: invalid YAML ({' '.join(str(e).split())})")
    else:
        data = read_json_file(path, "--config")
    if not isinstance(data, dict):
        fail(f"--config {path}: expected an object of TrainConfig fields (e.g. {{\"method\": \"daa\", "
             f"\"steps\": 200}}), got {type(data).__name__}")
    accepted = [f.name for f in dataclasses.fields(TrainConfig)]
    unknown = sorted(set(data) - set(accepted))
    if unknown:
        fail(f"--config {path}: unknown field(s) {', '.join(unknown)}; accepted: {', '.join(accepted)}")
    if not isinstance(data.get("method_options", {}), dict):
        fail(f"--config {path}: method_options must be an object of method config fields, e.g. "
             '{"anneal_steps": 200}')
    return data


@app.command("train")
def train_command(
    ctx: typer.Context,
    method: Annotated[str | None, typer.Option(
        "--method", help="Method to train (see `attndenoise methods`), or a baseline: 'none' fine-tunes the "
        "attention projections q/k/v/o only, 'lora' trains a LoRA on them. Required (here or in --config).")] = None,
    out: Annotated[Path | None, typer.Option(
        "--out", help="Output directory: adapter, run.json, checkpoints. Required (here or in --config).")] = None,
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
    lr: Annotated[float, typer.Option("--lr", help="Peak learning rate (see --lr-scheduler).")] = 1e-3,
    lr_scheduler: Annotated[str, typer.Option(
        "--lr-scheduler", help="Learning-rate schedule after warmup: linear (decay to 0), constant, "
        "constant_with_warmup or cosine.")] = "linear",
    warmup_steps: Annotated[int, typer.Option("--warmup-steps", help="Steps of linear warmup to --lr.")] = 0,
    weight_decay: Annotated[float, typer.Option("--weight-decay", help="AdamW weight decay (>= 0).")] = 0.0,
    dtype: Annotated[str, typer.Option(
        "--dtype", help="Precision of the base model: float32, bfloat16 or float16.")] = "float32",
    noise_mix: Annotated[str | None, typer.Option(
        "--noise-mix", help="Comma-separated noise ratios in [0, 1): each training example gets one of them "
        "(seeded), e.g. 0.5,0.8,0.9. Overrides --noise.")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Examples per process per micro-batch.")] = 4,
    grad_accum: Annotated[int, typer.Option("--grad-accum", help="Micro-batches accumulated per step.")] = 1,
    max_length: Annotated[int, typer.Option(
        "--max-length", help="Maximum tokens per example; longer ones lose distractors farthest from the gold "
        "first, and are skipped if even the gold documents do not fit.")] = 512,
    seed: Annotated[int, typer.Option("--seed", help="Seed for data order, noise and initialisation.")] = 0,
    save_steps: Annotated[int, typer.Option("--save-steps", help="Write a checkpoint every N steps.")] = 50,
    resume: Annotated[bool, typer.Option(
        "--resume", help="Continue from the last complete checkpoint in --out (start fresh if there is none). "
        "Refused when the settings differ from the checkpoint's (the message names them); a finished run is left "
        "as it is.")] = False,
    force_resume: Annotated[bool, typer.Option(
        "--force-resume", help="With --resume: continue even though the settings differ (run.json records the "
        "change under resume_overrides).")] = False,
    split: Annotated[str | None, typer.Option(
        "--split", help="Multi-document QA data (question/answers/ctxs): train on this split of the fixed "
        "70/10/20 split: train, validation or test (default train when --distractors is given).")] = None,
    distractors: Annotated[int | None, typer.Option(
        "--distractors", help="Multi-document QA data: distractor passages around each gold passage (drawn from "
        "every question's gold passage; never one containing an answer).")] = None,
    distractor_kind: Annotated[str, typer.Option(
        "--distractor-kind", help="hard (BM25's best answer-free passages for the question) or random.")] = "hard",
    prompt: Annotated[str, typer.Option(
        "--prompt", help="litm (the Lost in the Middle prompt), default ('Document [i]:' lines) or auto (litm with "
        "--distractors/--split).")] = "auto",
    attention: Annotated[bool, typer.Option(
        "--attention", help="Train the patched layers' attention projections (q, k, v, o) together with the method "
        "(the DAA paper's protocol; compare with --method none).")] = False,
    lm_head: Annotated[bool, typer.Option("--lm-head", help="With --attention, train lm_head too.")] = False,
    method_lr: Annotated[float | None, typer.Option(
        "--method-lr", help="With --attention or --lora: the learning rate of the method's own parameters (the "
        "projections or LoRA keep --lr, the baseline's rate).")] = None,
    top_layers: Annotated[int | None, typer.Option(
        "--top-layers", help="Patch and train only the top K decoder layers; the frozen layers below run once per "
        "training example (cached on disk) instead of once per step.")] = None,
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
    config_file: Annotated[Path | None, typer.Option(
        "--config", help="A JSON (or YAML, with pyyaml) file of TrainConfig fields, e.g. {\"method\": \"daa\", "
        "\"steps\": 500, \"method_options\": {\"anneal_steps\": 250}}; flags given on the command line override "
        "it (--set per field of method_options).")] = None,
    threads: Annotated[int | None, typer.Option(
        "--threads", help="CPU threads for torch per process (default: torch's choice).")] = None,
) -> None:
    """Train a method (or the 'none' / 'lora' baseline) and write its adapter and run.json to --out.

    Under `torchrun --nproc_per_node N` the same command trains data-parallel (global batch = N x batch size x grad
    accum); only the first process writes files. When --set does not give anneal_steps, the lambda schedule
    anneals over the whole run (anneal_steps = --steps).

    Example: attndenoise train --method daa --steps 200 --out runs/daa

    Example: attndenoise train --config daa.json --lr 5e-4 --out runs/daa-lr5e-4
    """
    from ..train import TrainConfig, train

    params = dict(ctx.params)
    with user_errors():
        from_file = read_config_file(config_file) if config_file is not None else {}
        # by name: typer ships its own copy of click, whose ParameterSource is not click.core's
        given = {name for name in params
                 if getattr(ctx.get_parameter_source(name), "name", "") in ("COMMANDLINE", "ENVIRONMENT")}
        values = dict(from_file)  # the file first; a flag given on the command line wins, then the flags' defaults
        for name, value in params.items():
            field = _FIELD.get(name, name)
            if name in _NOT_CONFIG:
                continue
            if name == "set_":
                values[field] = {**from_file.get("method_options", {}), **parse_sets(value or [])}
            elif name in given or field not in from_file:
                if name == "noise_mix" and value is not None:
                    value = numbers(value, "--noise-mix", low=0.0, high=1.0, high_open=True)
                values[field] = str(value) if name == "out" and value is not None else value
        for required in ("method", "out"):
            if not values.get(required):
                fail(f"--{required} is missing: give --{required} (or \"{required}\" in a --config file)")
        config = TrainConfig(**values)
        note = lambda_note(config)
        if note is not None and os.environ.get("RANK", "0") == "0":
            Console(stderr=True, soft_wrap=True).print(note, highlight=False, markup=False)
        set_threads(threads)
        with one_line_warnings():
            result = train(config)
    if result.already_finished:
        if result.main_process:
            Console(soft_wrap=True).print(
                f"nothing to do: {result.out_dir} holds a finished run ({result.run['steps']} steps) with these "
                "settings; run.json is unchanged", highlight=False)
        return
    run = result.run
    losses = run["loss_history"]
    if losses and result.main_process:
        Console(soft_wrap=True).print(
            f"trained {run['kind']} ({run['method']}) for {run['steps']} steps in {run['seconds']:.1f} s: "
            f"loss {losses[0]['loss']:.4f} -> {losses[-1]['loss']:.4f}; wrote {result.out_dir}", highlight=False,
        )
