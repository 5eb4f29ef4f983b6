"""Method configurations: the common fields every method shares, validated at construction.

Each method file defines a dataclass that subclasses :class:`MethodConfig` and adds its own options (docs/methods.md
has one section per method). Configs are plain data: they serialise to ``attndenoise_config.json`` and back.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

LayerSpec = str | list[int]

_SCHEDULES = ("paper", "linear")
_GRANULARITIES = ("head", "layer")


class ConfigError(ValueError):
    """A configuration value is unknown or out of range; the message lists what is accepted."""


def choice(name: str, value: Any, accepted: tuple[Any, ...]) -> None:
    """Shared check for options with a fixed set of values; the message lists them."""
    if value not in accepted:
        raise ConfigError(f"{name}={value!r} is not accepted; choose one of {', '.join(map(repr, accepted))}")


_choice = choice  # the name before it was public


@dataclass
class MethodConfig:
    """Fields shared by every method.

    Attributes:
        layers: which attention layers get the method: ``"all"``, a list of layer indices (negative indices count
            from the end), or ``"every:N"`` (layers 0, N, 2N, ...) / ``"every:N:OFFSET"``.
        anneal_steps: ``T`` of the lambda schedule (docs/methods.md, section Lambda schedule); ``0`` means lambda
            equals the learned lambda from the first step.
        lambda_init: the constant of the schedule, a float or ``"depth"`` for ``0.8 - 0.6 exp(-0.3 l)``.
        lambda_schedule: ``"paper"`` is eq. 3 of the DAA paper taken literally (it peaks at ``lambda_init / 4`` at
            ``T/2``); ``"linear"`` is ``min(1, t/T) * lambda_init + lambda_learn``.
        lambda_granularity: one learned lambda per query head (``"head"``) or per layer (``"layer"``).
    """

    name: ClassVar[str] = ""
    #: one line for `attndenoise methods` and the README
    summary: ClassVar[str] = ""
    #: whether the method has parameters to train (SRA does not)
    trainable: ClassVar[bool] = True
    #: whether ``anneal_steps`` / ``lambda_*`` drive the method (OpAmp and SRA have no lambda schedule)
    uses_lambda_schedule: ClassVar[bool] = True
    #: whether the method computes two attention maps per head (benchmarks hold these to the cost of two maps)
    two_maps: ClassVar[bool] = False

    layers: LayerSpec = "all"
    anneal_steps: int = 1000
    lambda_init: float | str = 0.8
    lambda_schedule: str = "paper"
    lambda_granularity: str = "head"

    def __post_init__(self) -> None:
        self.validate()

    # -- validation ---------------------------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the field, the bad value and what is accepted."""
        if isinstance(self.layers, str):
            if self.layers != "all":
                _parse_every(self.layers)
        elif isinstance(self.layers, (list, tuple)):
            if not self.layers or not all(isinstance(i, int) and not isinstance(i, bool) for i in self.layers):
                raise ConfigError(f"layers={self.layers!r}: give a non-empty list of layer indices")
            self.layers = list(self.layers)
        else:
            raise ConfigError(f"layers={self.layers!r}: accepted are 'all', a list of indices, or 'every:N'")
        if not isinstance(self.anneal_steps, int) or isinstance(self.anneal_steps, bool) or self.anneal_steps < 0:
            raise ConfigError(f"anneal_steps={self.anneal_steps!r}: must be an integer >= 0")
        if isinstance(self.lambda_init, str):
            choice("lambda_init", self.lambda_init, ("depth",))
        elif (isinstance(self.lambda_init, bool) or not isinstance(self.lambda_init, (int, float))
              or not math.isfinite(self.lambda_init)):
            # bool is an int subclass: True would silently mean 1.0
            raise ConfigError(f"lambda_init={self.lambda_init!r}: must be a finite number or 'depth'")
        choice("lambda_schedule", self.lambda_schedule, _SCHEDULES)
        choice("lambda_granularity", self.lambda_granularity, _GRANULARITIES)

    @property
    def needs_calibration(self) -> bool:
        """Whether :func:`attndenoise.apply` needs ``calibration_inputs`` (sample data) to resolve an option
        (DEX's entropy head selection does); training passes a few training examples then."""
        return False

    # -- layer selection ----------------------------------------------------------------------------------------
    def select_layers(self, num_layers: int) -> list[int]:
        """Resolve :attr:`layers` against a model with ``num_layers`` attention layers.

        A selection that selects no layer (``"every:4:6"`` on a 4-layer model) raises :class:`ConfigError`: patching
        nothing would save an empty adapter and give the optimiser no parameters.
        """
        if self.layers == "all":
            return list(range(num_layers))
        if isinstance(self.layers, str):
            every, offset = _parse_every(self.layers)
            chosen = list(range(offset, num_layers, every))
            if not chosen:
                raise ConfigError(
                    f"layers={self.layers!r} selects no layer of a model with {num_layers} layers (the offset must "
                    f"be < {num_layers}); accepted: 'all', indices in [-{num_layers}, {num_layers - 1}], 'every:N' "
                    "or 'every:N:OFFSET'"
                )
            return chosen
        out = []
        for i in self.layers:
            j = i + num_layers if i < 0 else i
            if not 0 <= j < num_layers:
                raise ConfigError(f"layers: index {i} is out of range for a model with {num_layers} layers")
            out.append(j)
        return sorted(set(out))

    def lambda_init_for(self, layer: int) -> float:
        """The schedule constant for ``layer`` (``"depth"`` is the Differential Transformer's depth rule)."""
        if self.lambda_init == "depth":
            return 0.8 - 0.6 * math.exp(-0.3 * layer)
        return float(self.lambda_init)

    # -- serialisation ------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"method": self.name, **dataclasses.asdict(self)}

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MethodConfig:
        data = {k: v for k, v in data.items() if k != "method"}
        unknown = sorted(set(data) - set(cls.field_names()))
        if unknown:
            raise ConfigError(
                f"unknown field(s) {', '.join(unknown)} for method '{cls.name}'; "
                f"accepted: {', '.join(cls.field_names())}"
            )
        return cls(**data)


def _parse_every(spec: str) -> tuple[int, int]:
    parts = spec.split(":")
    try:
        if parts[0] != "every" or len(parts) not in (2, 3):
            raise ValueError
        every = int(parts[1])
        offset = int(parts[2]) if len(parts) == 3 else 0
        if every < 1 or offset < 0:
            raise ValueError
    except ValueError:
        raise ConfigError(
            f"layers={spec!r}: accepted are 'all', a list of indices, 'every:N' or 'every:N:OFFSET' (N >= 1)"
        ) from None
    return every, offset


def positive(name: str, value: Any, *, allow_zero: bool = False) -> None:
    """Shared check for numeric options of the method configs."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{name}={value!r}: must be a number {'>=' if allow_zero else '>'} 0")


def boolean(name: str, value: Any) -> None:
    """Shared check for on/off options: ``1`` or ``"no"`` from a JSON or command-line config is refused, not read."""
    if not isinstance(value, bool):
        raise ConfigError(f"{name}={value!r}: must be true or false")


__all__ = ["ConfigError", "MethodConfig", "LayerSpec", "positive", "boolean", "choice", "field"]
