"""``attndenoise methods``: what exists, one line each; ``attndenoise methods NAME``: that method's config fields."""

from __future__ import annotations

import dataclasses
import inspect
import json
import re
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from .. import registry
from ..config import MethodConfig
from . import app
from .common import fail

#: fields that only matter to methods with a lambda schedule
SCHEDULE_FIELDS = ("anneal_steps", "lambda_init", "lambda_schedule", "lambda_granularity")
_ENTRY = re.compile(r"^(?P<names>[a-z_][a-z0-9_]*(?:\s*/\s*[a-z_][a-z0-9_]*)*):\s*(?P<text>.*)$")


def field_help(cls: type[MethodConfig]) -> dict[str, str]:
    """Field name -> its description, read from the ``Attributes:`` sections of the config class and its bases (the
    class's own entry wins), so the documentation is written once, in the docstring."""
    out: dict[str, str] = {}
    for klass in cls.__mro__:
        doc = inspect.getdoc(klass) if klass.__doc__ else None
        if not doc or "Attributes:" not in doc:
            continue
        entries: list[tuple[list[str], list[str]]] = []  # (names, text lines) in order
        for line in doc.split("Attributes:", 1)[1].splitlines()[1:]:
            if not line.strip():
                break  # the section ends at the first blank line
            entry = _ENTRY.match(line.strip())
            if entry and len(line) - len(line.lstrip()) <= 4:
                entries.append(([n.strip() for n in entry["names"].split("/")], [entry["text"]]))
            elif entries:
                entries[-1][1].append(line.strip())
        for names, text in entries:
            for name in names:
                out.setdefault(name, " ".join(text).strip())
    return out


def _default(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return "(required)"


@app.command("methods")
def methods_command(
    name: Annotated[str | None, typer.Argument(help="a method: list its config fields with defaults and help")] = None,
) -> None:
    """List the registered methods with their configuration class and a one-line description; with NAME, that
    method's config fields (what `--set key=value` accepts), their defaults and what they do.

    Example: attndenoise methods

    Example: attndenoise methods sra
    """
    if name is None:
        table = Table("method", "config", "mergeable", "what it does")
        mergeable = set(registry.mergeable_methods())
        for method, cfg in sorted(registry.METHODS.items()):
            table.add_row(method, cfg.__name__, "yes" if method in mergeable else "no", cfg.summary)
        Console().print(table)
        return
    if name not in registry.METHODS:
        fail(f"unknown method {name!r}; known methods: {', '.join(sorted(registry.METHODS))}")
    cls = registry.METHODS[name]
    helps = field_help(cls)
    kind = "trainable" if cls.trainable else "inference only"
    table = Table("field", "default", "what it does", title=f"{name} ({cls.__name__}, {kind}): {cls.summary}")
    for f in dataclasses.fields(cls):
        text = _plain(helps.get(f.name, ""))
        if f.name in SCHEDULE_FIELDS and not cls.uses_lambda_schedule:
            text = f"unused: {name} has no lambda schedule"
        elif f.name == "anneal_steps":
            text += " attndenoise train: default the run's --steps (the ramp follows the run length)."
        table.add_row(f.name, repr(_default(f)), text)
    Console().print(table)
    own = [f for f in dataclasses.fields(cls) if f.name not in MethodConfig.field_names()]
    example = own[0] if own else dataclasses.fields(cls)[0]
    command = f"train --method {name}" if cls.trainable else f"eval --method {name}"
    Console().print(f"set a field with --set (values are read as JSON when they parse), e.g. attndenoise {command} "
                    f"--set {example.name}={_text(_default(example))}", highlight=False)


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _plain(text: str) -> str:
    """Docstring markup as plain text: ``code`` and :class:`X` lose their marks."""
    return re.sub(r":\w+:`([^`]+)`", r"\1", text).replace("``", "")
