"""One file per method; importing this package registers them all (see :mod:`attndenoise.registry`)."""

from . import daa, dex, diff, diffqkv, dint, opamp, sra  # noqa: F401
