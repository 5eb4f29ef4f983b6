"""Moved to :mod:`attndenoise.methods.opamp_checkpoint`, beside the OpAmp method; this name stays importable."""

from .methods.opamp_checkpoint import *  # noqa: F403
from .methods.opamp_checkpoint import __all__  # noqa: F401
