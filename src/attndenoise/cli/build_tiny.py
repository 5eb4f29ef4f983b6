"""``attndenoise build-tiny``: pretrain the embedded tiny model explicitly (the package ships the default one)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from . import app
from .train import parse_sets

_err = Console(stderr=True)


@app.command("build-tiny")
def build_tiny_command(
    out: Annotated[Path | None, typer.Option(help="folder to build into (as tiny-<hash>/); default: the cache")] = None,
    threads: Annotated[int, typer.Option(help="torch threads; the shipped weights were built with 1")] = 1,
    set_: Annotated[list[str] | None, typer.Option(
        "--set", help="a TinyConfig field, key=value (repeatable), e.g. --set steps=200 --set hidden_size=64")] = None,
) -> None:
    """Pretrain the tiny model (about 5 minutes on 2 cores for the default settings) and print its folder.

    The default model ships with the package, so nothing needs this unless you change TinyConfig; a folder that
    already holds the model is reused. Example: attndenoise build-tiny --out src/attndenoise/assets --threads 1
    """
    from ..tiny import TinyConfig, tiny_model_path

    if threads < 1:
        _err.print(f"error: --threads {threads}: must be >= 1", highlight=False)
        raise typer.Exit(2)
    overrides = parse_sets(set_ or [])
    try:
        TinyConfig(**overrides)
    except (TypeError, ValueError) as e:
        fields = ", ".join(TinyConfig.__dataclass_fields__)
        _err.print(f"error: {e}; TinyConfig fields: {fields}", highlight=False)
        raise typer.Exit(2) from None
    path = tiny_model_path(out, threads=threads, rebuild=True, **overrides)
    Console().print(str(path))
