"""``attndenoise demo``: train every method on the embedded default, evaluate, write a report with plots."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from ..demo import DemoConfig, run_demo, trainable_methods
from . import app


@app.command("demo")
def demo_command(
    out: Annotated[Path, typer.Option(help="Output directory for report.md, plots, results and training runs.")] = Path(
        "demo_out"),
    seeds: Annotated[int, typer.Option(help="Seeds to repeat everything with; 3 gives mean and spread.")] = 1,
    methods: Annotated[str, typer.Option(
        help="Comma-separated trainable methods to train (default: all). Baselines none and lora always run.")] = "",
    steps: Annotated[int, typer.Option(help="Training steps per method (the same for all).")] = DemoConfig.steps,
    batch_size: Annotated[int, typer.Option(help="Training examples per step.")] = DemoConfig.batch_size,
    lr: Annotated[float, typer.Option(help="Learning rate of every trained row but OpAmp (5e-4, chosen on a "
                                      "validation split).")] = DemoConfig.learning_rate,
    train_noise: Annotated[float, typer.Option(help="Noise ratio of the training contexts.")] = DemoConfig.train_noise,
    n_eval: Annotated[int, typer.Option(help="Held-out QA questions per noise ratio.")] = DemoConfig.n_eval,
    threads: Annotated[int, typer.Option(help="torch threads (0: torch's default).")] = 0,
) -> None:
    """Run the demo: tiny base model, plain fine-tuning, LoRA and every trainable method trained on the same noisy
    data, SRA on the base, evaluation at noise 0/0.5/0.8/0.9, needle grid, attention to gold; writes report.md.

    Example: attndenoise demo --seeds 3 --methods daa,dex --out demo_out
    """
    console = Console()
    chosen = [m.strip() for m in methods.split(",") if m.strip()] or None
    try:
        cfg = DemoConfig(out=str(out), seeds=seeds, methods=chosen, steps=steps, batch_size=batch_size,
                         learning_rate=lr, train_noise=train_noise, n_eval=n_eval, threads=threads or None)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    start = time.perf_counter()
    console.print(f"[bold]attndenoise demo[/]: {len(cfg.labels())} models x {seeds} seed(s); trainable methods: "
                  f"{', '.join(trainable_methods())}")
    with console.status("starting") as status:
        def progress(msg: str) -> None:
            console.log(f"[{time.perf_counter() - start:6.0f} s] {msg}")
            status.update(msg)

        report = run_demo(cfg, progress)
    console.print(f"[green]report:[/] {report}")
