"""The lambda schedule and how to advance it (the Trainer callback is in ``hf_trainer``).

``lambda(t) = (1 - alpha) * (t / T) * lambda_init + alpha * lambda_learn``, ``alpha = min(1, t / T)`` (eq. 3 of the
DAA paper; docs/methods.md, section Lambda schedule).
The step ``t`` is a persistent buffer of every :class:`LambdaSchedule`, so it is saved with the adapter and a
reloaded adapter computes what it computed when saved.
"""

from __future__ import annotations

import torch
from torch import nn

from .wrappers import unwrap


class LambdaSchedule(nn.Module):
    """Learned lambda of one layer plus the schedule state.

    Args:
        num: 1 (one lambda for the layer) or the number of query heads (one per head).
        lambda_init: the schedule constant of this layer.
        anneal_steps: ``T``; 0 means ``lambda = lambda_learn`` from the first step.
        kind: ``"paper"`` (eq. 3 of the DAA paper, literal) or ``"linear"``
            (``min(1, t/T) lambda_init + lambda_learn``).
    """

    step: torch.Tensor

    def __init__(self, num: int, lambda_init: float, anneal_steps: int, kind: str = "paper") -> None:
        super().__init__()
        # The papers initialise lambda_learn "around zero"; exactly zero keeps identity at t = 0.
        self.lambda_learn = nn.Parameter(torch.zeros(num))
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self.lambda_init = float(lambda_init)
        self.anneal_steps = int(anneal_steps)
        self.kind = kind

    def forward(self) -> torch.Tensor:
        """Current lambda, shape ``(num,)``, float32."""
        learn = self.lambda_learn.float()
        if self.anneal_steps == 0:
            return learn
        ramp = self.step.float() / self.anneal_steps
        alpha = torch.clamp(ramp, max=1.0)
        if self.kind == "linear":
            return alpha * self.lambda_init + learn
        return (1 - alpha) * ramp * self.lambda_init + alpha * learn

    def extra_repr(self) -> str:
        return f"init={self.lambda_init}, T={self.anneal_steps}, kind={self.kind}"


def _schedules(model: nn.Module) -> list[LambdaSchedule]:
    return [m for m in unwrap(model).modules() if isinstance(m, LambdaSchedule)]


def step(model: nn.Module, n: int = 1) -> int:
    """Advance every lambda schedule of ``model`` by ``n`` steps (for custom training loops); returns the step."""
    scheds = _schedules(model)
    for s in scheds:
        s.step.add_(n)
    return int(scheds[0].step) if scheds else 0


def set_step(model: nn.Module, value: int) -> None:
    """Set the schedule step of every layer (the Trainer callback uses the global step, so resuming is exact)."""
    for s in _schedules(model):
        s.step.fill_(int(value))


def current_lambdas(model: nn.Module) -> dict[str, list[float]]:
    """Current lambda per patched layer (module name -> values), for logging; names are those inside any wrapper
    (PeftModel, DDP), so they do not change with the wrapping."""
    out = {}
    for name, m in unwrap(model).named_modules():
        if isinstance(m, LambdaSchedule):
            out[name] = [round(float(v), 6) for v in m().detach().cpu()]
    return out


__all__ = ["LambdaSchedule", "step", "set_step", "current_lambdas", "unwrap"]
