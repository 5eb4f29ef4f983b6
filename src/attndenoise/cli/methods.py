"""``attndenoise methods``: what exists, one line each."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from .. import registry
from . import app


@app.command("methods")
def methods_command() -> None:
    """List the registered methods with their configuration class and a one-line description."""
    table = Table("method", "config", "mergeable", "what it does")
    mergeable = set(registry.mergeable_methods())
    for name, cfg in sorted(registry.METHODS.items()):
        table.add_row(name, cfg.__name__, "yes" if name in mergeable else "no", cfg.summary)
    Console().print(table)
