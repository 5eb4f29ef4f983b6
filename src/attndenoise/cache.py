"""Built artefacts cached on disk (the tiny model, converted GGUF models, BM25 indexes): locked, atomic, tidy.

Every entry is a folder ``root/<name>`` that is complete once its ``marker`` file exists. ``cached_build`` makes the
build safe for several processes at once and for interruptions:

* an exclusive ``fcntl`` lock on ``root/.<name>.lock`` serialises builders of the same entry, so two processes never
  build it twice; the second one waits and then reuses the first one's result;
* the build writes into a temporary folder beside the entry and renames it into place (atomic on one filesystem), so
  a killed build never leaves a half-written entry; temporary folders of earlier killed builds of the same entry are
  removed while the lock is held (nobody else can be writing them then);
* files and folders get the permissions the umask gives (``tempfile.mkdtemp`` would make the folder 0700).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

CACHE_ENV = "ATTNDENOISE_CACHE"


def default_cache_dir() -> Path:
    """``$ATTNDENOISE_CACHE`` if set, else ``~/.cache/attndenoise``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "attndenoise"


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on ``path`` (created if missing), released on exit or when the process dies."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _apply_umask(folder: Path) -> None:
    """Give ``folder`` and everything in it the umask's permissions (as ``open`` / ``mkdir`` would)."""
    mask = _umask()
    for dirpath, dirnames, filenames in os.walk(folder):
        os.chmod(dirpath, 0o777 & ~mask)
        for f in filenames:
            os.chmod(os.path.join(dirpath, f), 0o666 & ~mask)
        del dirnames  # os.walk recurses by itself


def cached_build(root: Path, name: str, marker: str, build: Callable[[Path], object]) -> Path:
    """``root/name``, running ``build(tmp_folder)`` first when the entry is missing (``marker`` not in it).

    ``build`` must write ``marker`` last. Returns the finished entry's path.
    """
    final = root / name
    if (final / marker).exists():
        return final
    root.mkdir(parents=True, exist_ok=True)
    with file_lock(root / f".{name}.lock"):
        if (final / marker).exists():  # built by another process while we waited for the lock
            return final
        prefix = f".{name}.tmp-"
        for stale in root.glob(prefix + "*"):
            shutil.rmtree(stale, ignore_errors=True)
        if final.exists():  # an entry without its marker: an older layout or a manual copy gone wrong
            shutil.rmtree(final)
        tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=root))
        try:
            build(tmp)
            if not (tmp / marker).exists():
                raise RuntimeError(f"the build of {name} did not write {marker}")
            _apply_umask(tmp)
            os.replace(tmp, final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return final
