"""One file per method; importing this package registers them all (see :mod:`attndenoise.registry`)."""

from . import daa, dex, diffqkv  # noqa: F401
