"""The ``attndenoise`` command line (typer + rich).

``app`` is created here; each command lives in its own module of this package and registers itself on ``app`` when
imported (the imports at the bottom), so commands can grow without touching one another.
"""

from __future__ import annotations

import typer

app = typer.Typer(
    name="attndenoise",
    help="Make pretrained language models attend to the relevant part of a noisy context.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root() -> None:
    """Make pretrained language models attend to the relevant part of a noisy context."""
    # A callback keeps typer in multi-command mode even while only one command is registered.


# Commands register themselves on `app` when imported; keep this list sorted.
from . import bench, build_tiny, demo, evaluate, inspect, methods, robustness, study  # noqa: E402,F401
from . import train as _train  # noqa: E402,F401


def main() -> None:
    """Entry point of the ``attndenoise`` console script."""
    app()


__all__ = ["app", "main"]
