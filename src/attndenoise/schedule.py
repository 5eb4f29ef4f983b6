"""The lambda schedule and how to advance it (the Trainer callback is in ``hf_trainer``).

``lambda(t) = (1 - alpha) * (t / T) * lambda_init + alpha * lambda_learn``, ``alpha = min(1, t / T)`` (eq. 3 of the
DAA paper; docs/methods.md, section Lambda schedule).
The step ``t`` is a persistent buffer of every :class:`LambdaSchedule`, so it is saved with the adapter and a
reloaded adapter computes what it computed when saved.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import MethodConfig
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


class ReparamLambda(LambdaSchedule):
    """The Differential Transformer's ``r = exp(lq1 . lk1) - exp(lq2 . lk2) + lambda_init`` (Ye et al.,
    "Differential Transformer", arXiv 2410.05258) under the common warm-up.

    The four vectors are drawn from ``N(0, std^2)`` (length ``head_dim``; one set per layer, or per head/pair). ``r``
    enters the schedule *in place of* ``lambda_learn``: ``"paper"``: ``lambda(t) = (1 - a) (t/T) lambda_init + a r``,
    ``"linear"``: ``lambda(t) = a r``, ``a = min(1, t/T)``. So ``lambda(0) = 0`` (identity at init when
    ``anneal_steps > 0``) and ``lambda(t >= T) = r`` ("once warm-up ends"); with ``anneal_steps=0`` ``lambda = r``
    from the start, as in a from-scratch DIFF model (not the identity then). See docs/methods.md, section DIFF
    retrofit.

    A :class:`LambdaSchedule` subclass so that :func:`step`, the Trainer callback and saving treat its ``step`` like
    every other schedule's; it has no ``lambda_learn``.
    """

    lambda_q1: nn.Parameter
    lambda_k1: nn.Parameter
    lambda_q2: nn.Parameter
    lambda_k2: nn.Parameter

    def __init__(
        self, num: int, dim: int, lambda_init: float, anneal_steps: int, kind: str, std: float
    ) -> None:
        super().__init__(num, lambda_init, anneal_steps, kind)
        del self.lambda_learn
        for name in ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2"):
            self.register_parameter(name, nn.Parameter(torch.randn(num, dim) * std))

    def reparam(self) -> torch.Tensor:
        """``r``, shape ``(num,)``, float32."""
        e1 = torch.exp((self.lambda_q1.float() * self.lambda_k1.float()).sum(-1))
        e2 = torch.exp((self.lambda_q2.float() * self.lambda_k2.float()).sum(-1))
        return e1 - e2 + self.lambda_init

    def forward(self) -> torch.Tensor:
        r = self.reparam()
        if self.anneal_steps == 0:
            return r
        ramp = self.step.float() / self.anneal_steps
        alpha = ramp.clamp(max=1.0)
        if self.kind == "linear":
            return alpha * r
        return (1 - alpha) * ramp * self.lambda_init + alpha * r


def schedule_for(
    config: MethodConfig, layer: int, num: int, *, reparam_dim: int | None = None, reparam_std: float = 0.1
) -> LambdaSchedule:
    """The lambda of layer ``layer`` under ``config``'s common fields: ``num`` values (one per head) or one
    (``lambda_granularity="layer"``). ``reparam_dim`` given: :class:`ReparamLambda` with vectors of that length
    drawn with ``reparam_std``; otherwise the plain :class:`LambdaSchedule`."""
    n = num if config.lambda_granularity == "head" else 1
    init = config.lambda_init_for(layer)
    if reparam_dim is not None:
        return ReparamLambda(n, reparam_dim, init, config.anneal_steps, config.lambda_schedule, reparam_std)
    return LambdaSchedule(n, init, config.anneal_steps, config.lambda_schedule)


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


__all__ = ["LambdaSchedule", "ReparamLambda", "schedule_for", "step", "set_step", "current_lambdas", "unwrap"]
