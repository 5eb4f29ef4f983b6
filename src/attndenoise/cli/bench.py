"""``attndenoise bench``: a quick speed/memory comparison of methods vs the stock model on a random Llama (the toy
shape by default, SmolLM2-135M's with ``--shape smollm2``)."""

from __future__ import annotations

import statistics
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from .. import benchmark as B
from .. import registry
from . import app


@app.command("bench")
def bench_command(
    methods: Annotated[
        list[str] | None, typer.Argument(help="methods to compare (default: every trainable one)")
    ] = None,
    length: Annotated[int, typer.Option(help="sequence length of the training step")] = 512,
    context: Annotated[int, typer.Option(help="tokens of context before decoding")] = 512,
    new_tokens: Annotated[int, typer.Option(help="tokens decoded per round")] = 32,
    rounds: Annotated[int, typer.Option(help="timed rounds (configurations interleaved in each)")] = 3,
    threads: Annotated[int, typer.Option(help="torch threads (set for the measurement, then restored)")] = 1,
    memory: Annotated[bool, typer.Option(help="measure step peak memory (one subprocess per configuration)")] = True,
    decode: Annotated[bool, typer.Option(help="measure decoding speed")] = True,
    quick: Annotated[bool, typer.Option(help="length 128, context 128, 8 new tokens, 2 rounds: a few seconds")] = False,
    shape: Annotated[
        str, typer.Option(help=f"model shape: {' or '.join(B.SHAPES)} (random weights); toy is the quick one")
    ] = "toy",
    compiled: Annotated[
        bool,
        typer.Option(
            "--compile/--no-compile",
            help="decode with torch.compile(model, dynamic=True) of stock and of every method (compiled vs "
            "compiled); the first decode of each compiles (~40 s each on the toy shape, 2 CPU cores)",
        ),
    ] = False,
) -> None:
    """Step time, step peak memory and decoding speed of METHODS as ratios to the stock model, measured now.

    Times are medians over rounds of the per-round ratio to stock (all configurations timed round-robin in each
    round, so background load affects them alike); "stock x2" runs the stock attention twice, the cost of two maps.
    For the full tables see bench/bench_step.py and bench/bench_decode.py.

    With --compile the decoding column compares compiled methods with compiled stock (the training step stays
    eager).

    Example: attndenoise bench daa diffk --quick --threads 2
    """
    import torch

    if shape not in B.SHAPES:
        raise typer.BadParameter(f"unknown shape '{shape}'; known: {', '.join(B.SHAPES)}")

    if quick:
        length, context, new_tokens, rounds = 128, 128, 8, 2
    trainable = B.trainable_methods()
    chosen = list(methods) if methods else trainable
    for m in chosen:
        if m not in registry.METHODS:
            raise typer.BadParameter(f"unknown method '{m}'; known: {', '.join(sorted(registry.METHODS))}")
        if m not in trainable:
            raise typer.BadParameter(f"'{m}' is inference-only; bench compares trainable methods")
    console = Console()
    console.print(f"{B.model_description(shape)}; {B.machine_info(threads)}")

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        step = B.step_times(["stock", "stock x2", *chosen], length, rounds, quiet=True, shape=shape)
        dec = (B.decode_times(["stock", *chosen], context, new_tokens, rounds, quiet=True, shape=shape,
                              compiled=compiled) if decode else None)
    finally:
        torch.set_num_threads(before)
    mem: dict[str, float] = {}
    if memory:  # after the timing, so the subprocesses do not load the CPU while it runs; in parallel (RSS is private)
        mem = B.step_peaks_mib(["stock", *chosen], length, threads, parallel=2, shape=shape)

    table = Table("method", f"step x stock @{length}", "step x (stock x2)", "step peak mem x stock",
                  f"{'compiled ' if compiled else ''}decode x stock @{context}",
                  title=f"ratios to stock, median of {rounds} rounds")
    for m in ["stock x2", *chosen]:
        table.add_row(
            m + (" (2 maps)" if m in B.TWO_MAP else ""),
            f"{B.median_ratio(step[m], step['stock']):.2f}",
            f"{B.median_ratio(step[m], step['stock x2']):.2f}",
            f"{mem[m] / mem['stock']:.2f}" if m in mem else "-",
            f"{B.median_ratio(dec[m], dec['stock']):.2f}" if dec is not None and m in dec else "-",
        )
    console.print(table)
    absolute = f"stock: {statistics.median(step['stock']) * 1000:.1f} ms/step"
    if "stock" in mem:
        absolute += f", step peak {mem['stock']:.0f} MiB"
    if dec is not None:
        absolute += f", {statistics.median(dec['stock']) * 1000:.2f} ms/token{' compiled' if compiled else ''}"
    console.print(absolute)
