"""What every command shares: the one-line error pattern, warnings as one line each, ``--threads``, ``--set`` and
argument checks that run before any model is loaded.

A user error (a bad option, a bad file, an adapter that does not fit, an unsupported model) ends in one line
``error: ...`` on stderr and exit code 2; only the library's own error types are caught, so a real bug still shows
its traceback.
"""

from __future__ import annotations

import contextlib
import json
import math
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import typer
from rich.console import Console

_err = Console(stderr=True, soft_wrap=True)


def fail(message: str) -> NoReturn:
    """Print ``error: message`` to stderr and exit with code 2."""
    _err.print(f"[red]error:[/red] {message}", highlight=False)
    raise typer.Exit(2)


def user_error_types() -> tuple[type[BaseException], ...]:
    """The exceptions that mean "the input is wrong", not "the code is wrong" (imported late: some pull in torch)."""
    from ..config import ConfigError
    from ..data import DataFormatError, ExampleTooLongError
    from ..families import UnsupportedModelError
    from ..io import AdapterLoadError
    from ..methods.sra import ShortPromptError
    from ..models import ModelNotFoundError
    from ..train import TrainError

    return (ConfigError, DataFormatError, ExampleTooLongError, UnsupportedModelError, AdapterLoadError,
            ShortPromptError, ModelNotFoundError, TrainError, FileNotFoundError)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn the library's user errors raised inside the block into ``error: ...`` and exit code 2."""
    try:
        yield
    except user_error_types() as e:
        message = e.args[0] if isinstance(e, FileNotFoundError) and e.args and isinstance(e.args[0], str) else e
        fail(str(message))


@contextlib.contextmanager
def one_line_warnings() -> Iterator[None]:
    """Show each warning raised inside the block once, as ``warning: ...`` on stderr, when it happens (Python's
    default shows the file, the line and the source line of the ``warnings.warn`` call)."""
    def show(message: Warning | str, category: type[Warning], *args: Any, **kwargs: Any) -> None:
        _err.print(f"[yellow]warning:[/yellow] {message}", highlight=False, markup=True)

    with warnings.catch_warnings():
        warnings.simplefilter("default")
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.showwarning = show  # type: ignore[assignment]
        yield


def int_list(text: str, option: str) -> tuple[int, ...]:
    """A comma-separated list of integers for ``option`` (``"0,4,9"``); a bad one is typer's usage error."""
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise typer.BadParameter(f"give comma-separated integers, got {text!r}", param_hint=option) from None
    if not values:
        raise typer.BadParameter("give at least one number", param_hint=option)
    return values


def set_threads(threads: int | None) -> None:
    """``--threads``: torch's intra-op threads for this process (``None``: torch's default)."""
    if threads is None:
        return
    if isinstance(threads, bool) or threads < 1:
        fail(f"--threads {threads}: give an integer >= 1 (or leave it out for torch's default)")
    import torch

    torch.set_num_threads(threads)


def parse_sets(items: list[str]) -> dict[str, Any]:
    """``["anneal_steps=200", "layers=[0,1]", "where=pre_rope"]`` -> typed values (JSON where it parses, else text)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            fail(f"--set {item!r}: expected key=value (e.g. --set anneal_steps=200)")
        try:
            value: Any = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        out[key.strip()] = value
    return out


def numbers(text: str, option: str, *, kind: type = float, low: float | None = None, high: float | None = None,
            high_open: bool = False) -> list[Any]:
    """Comma-separated numbers of ``option``, each checked against ``[low, high]`` (``high`` excluded with
    ``high_open``); a bad or empty list fails naming the option and what is accepted."""
    what = "integers" if kind is int else "numbers"
    bounds = ""
    if low is not None or high is not None:
        lo, hi = "-inf" if low is None else f"{low:g}", "inf" if high is None else f"{high:g}"
        bounds = f" in [{lo}, {hi}{')' if high_open else ']'}"
    try:
        values = [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        fail(f"{option} {text!r}: give comma-separated {what}{bounds}")
    if not values:
        fail(f"{option}: give at least one of the comma-separated {what}{bounds}")
    for v in values:
        bad = (not math.isfinite(v) or (low is not None and v < low)
               or (high is not None and (v >= high if high_open else v > high)))
        if bad:
            fail(f"{option} {v:g} is out of range: give {what}{bounds}")
    return values


def at_least(value: int, option: str, low: int = 1) -> None:
    """Fail unless the integer option is >= ``low``."""
    if value < low:
        fail(f"{option} {value}: give an integer >= {low}")


def output_folder(out: Path, option: str = "--out") -> None:
    """An output folder may exist (it is added to) but must not be a file."""
    if out.exists() and not out.is_dir():
        fail(f"{option} {out} is a file; give a folder (it is created if missing)")


def check_adapter_dir(adapter: Path) -> None:
    """Before any model is loaded: ``adapter`` is a finished training run (run.json) or a saved method adapter, and
    its metadata reads (a Hub id is left to the loader)."""
    from ..io import CONFIG_NAME, LEGACY_CONFIG_NAME, read_config
    from ..train import RUN_FILE, read_run

    if not adapter.exists():
        from ..hub import is_hub_id

        if is_hub_id(str(adapter)):
            return
        fail(f"--adapter {adapter}: no such directory (give a training run folder, an adapter folder or a Hub id)")
    if not adapter.is_dir():
        fail(f"--adapter {adapter} is a file; give the folder of a training run ({RUN_FILE}) or of an adapter saved "
             f"by attndenoise.save ({CONFIG_NAME})")
    if (adapter / RUN_FILE).is_file():
        read_run(adapter)
    elif (adapter / CONFIG_NAME).is_file() or (adapter / LEGACY_CONFIG_NAME).is_file():
        read_config(adapter)
    elif any(adapter.glob("checkpoint-*")):
        fail(f"--adapter {adapter} holds checkpoints but no {RUN_FILE}: the run did not finish; continue it with "
             f"`attndenoise train --resume --out {adapter}` and the same settings")
    else:
        fail(f"--adapter {adapter} is not an adapter: it holds neither {RUN_FILE} (a finished `attndenoise train` "
             f"run) nor {CONFIG_NAME} (an adapter saved by attndenoise.save)")


def read_json_file(path: Path, option: str) -> Any:
    """A JSON file's content; a missing file or invalid JSON fails naming the file and the line."""
    if not path.is_file():
        fail(f"{option} {path}: no such file")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        fail(f"{option} {path}: not valid UTF-8 (byte {e.start})")
    except json.JSONDecodeError as e:
        fail(f"{path.name}:{e.lineno}: invalid JSON ({e.msg}, column {e.colno})")
