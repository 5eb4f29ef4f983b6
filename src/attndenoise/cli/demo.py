"""``attndenoise demo``: train every method on the embedded default, each against its own protocol's baseline,
evaluate, write a report with plots."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from ..demo import DemoConfig, run_demo
from . import app


@app.command("demo")
def demo_command(
    out: Annotated[Path, typer.Option(help="Output directory for report.md, plots, results and training runs.")] = Path(
        "demo_out"),
    seeds: Annotated[int, typer.Option(help="Seeds to repeat everything with; 3 gives mean and spread.")] = 1,
    methods: Annotated[str, typer.Option(
        help="Comma-separated trainable methods to train (default: all), each in its paper's protocol (opamp+lora, "
             "<m>+attn for the others). Baselines none and lora always run.")] = "",
    all_protocols: Annotated[bool, typer.Option(
        "--all-protocols", help="Train every chosen method in every protocol: <m>+attn (vs none), <m>+lora (vs lora), "
                                "<m> alone (vs lora~<m>, a LoRA of about its parameter count).")] = False,
    steps: Annotated[int, typer.Option(help="Training steps per trained row (the same for all).")] = DemoConfig.steps,
    batch_size: Annotated[int, typer.Option(help="Training examples per step.")] = DemoConfig.batch_size,
    lr: Annotated[float, typer.Option(help="Learning rate of every trained row but OpAmp's (5e-4, chosen on a "
                                      "validation split).")] = DemoConfig.learning_rate,
    train_noise: Annotated[float, typer.Option(help="Noise ratio of the training contexts.")] = DemoConfig.train_noise,
    n_eval: Annotated[int, typer.Option(help="Held-out QA questions per noise ratio.")] = DemoConfig.n_eval,
    threads: Annotated[int, typer.Option(help="torch threads (0: torch's default).")] = 0,
) -> None:
    """Run the demo: tiny base model; plain fine-tuning of q/k/v/o (none), LoRA and every trainable method in its
    paper's protocol trained on the same noisy data; SRA on the base; evaluation at noise 0/0.5/0.8/0.9, needle grid
    (forgetting), attention to gold; writes report.md with each row judged against its own protocol's baseline.

    Example: attndenoise demo --seeds 3 --methods daa,dex --all-protocols --out demo_out
    """
    console = Console()
    chosen = [m.strip() for m in methods.split(",") if m.strip()] or None
    try:
        cfg = DemoConfig(out=str(out), seeds=seeds, methods=chosen, all_protocols=all_protocols, steps=steps,
                         batch_size=batch_size, learning_rate=lr, train_noise=train_noise, n_eval=n_eval,
                         threads=threads or None)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    start = time.perf_counter()
    console.print(f"[bold]attndenoise demo[/]: {len(cfg.labels())} models x {seeds} seed(s): "
                  f"{', '.join(cfg.labels())}")
    with console.status("starting") as status:
        def progress(msg: str) -> None:
            console.log(f"[{time.perf_counter() - start:6.0f} s] {msg}")
            status.update(msg)

        report = run_demo(cfg, progress)
    console.print(f"[green]report:[/] {report}")
