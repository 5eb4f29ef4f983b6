"""What a method supplies to the shared machinery: what differs between methods; the core does the rest.

A method is an ``nn.Module`` attached to one attention layer (as ``attn.attndenoise``). The patch machinery calls:

1. :meth:`MethodModule.prepare` before the family's own attention forward, with the layer input and the rotary
   ``(cos, sin)`` (for methods that form a second query/key from the layer input);
2. :meth:`MethodModule.store` on the *new* keys/values, before they enter the KV cache (for methods that cache
   something extra per key or change V; docs/methods.md, section Caching);
3. :meth:`MethodModule.attend` with the query and the whole (cached) stored keys/values, instead of the stock
   attention function.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from .. import attention as core
from ..config import MethodConfig
from ..families import Family, Geometry
from ..schedule import LambdaSchedule


class NotMergeableError(TypeError):
    """The method's output is not a fixed linear map of base weights, so it cannot be folded into them."""


@dataclass
class LayerInfo:
    """Where a method module sits."""

    index: int
    num_layers: int
    geometry: Geometry
    family: Family


@dataclass
class LayerContext:
    """Per-forward data the pre-hook gathers for one layer; dropped after the attention call."""

    hidden_states: torch.Tensor
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None
    cached: bool
    extras: dict[str, Any] = field(default_factory=dict)


@dataclass
class Call:
    """Arguments of one attention call, with the fast/eager switch applied uniformly (docs/methods.md, section
    Fused fast path)."""

    mask: torch.Tensor | None
    scaling: float | None
    dropout: float
    causal: bool
    softcap: float | None
    eager: bool

    def two_maps(self, q1, k1, q2, k2, v, c1, c2):  # type: ignore[no-untyped-def]
        return core.two_maps(
            q1, k1, q2, k2, v, c1, c2, mask=self.mask, scaling=self.scaling, dropout=self.dropout,
            causal=self.causal, softcap=self.softcap, eager=self.eager,
        )

    def one_map(self, q, k, v):  # type: ignore[no-untyped-def]
        return core.one_map(
            q, k, v, mask=self.mask, scaling=self.scaling, dropout=self.dropout, causal=self.causal,
            softcap=self.softcap, eager=self.eager,
        )


class MethodModule(nn.Module):
    """Base class of every method's per-layer module."""

    config_cls: ClassVar[type[MethodConfig]]
    #: True when :meth:`store` changes what enters the KV cache.
    caches_kv: ClassVar[bool] = False

    def __init__(self, config: MethodConfig, info: LayerInfo) -> None:
        super().__init__()
        self.config = config
        self.info = info

    def make_lambda(self, heads: int | None = None) -> LambdaSchedule:
        """The lambda schedule (docs/methods.md, section Lambda schedule) with this config's granularity and this
        layer's ``lambda_init``; ``heads`` is the number of per-head values (default: query heads)."""
        c = self.config
        num = (heads or self.info.geometry.num_heads) if c.lambda_granularity == "head" else 1
        return LambdaSchedule(num, c.lambda_init_for(self.info.index), c.anneal_steps, c.lambda_schedule)

    def prepare(self, attn: nn.Module, ctx: LayerContext) -> None:
        """Compute per-new-token quantities from the layer input (default: nothing)."""

    def check_cache(self, attn: nn.Module, cache: Any) -> None:
        """Raise when this method cannot run with ``cache`` (default: every cache works)."""

    def store(
        self, attn: nn.Module, key: torch.Tensor, value: torch.Tensor, ctx: LayerContext
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Turn the new keys/values into what is cached (default: unchanged)."""
        return key, value

    def attend(
        self, attn: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, ctx: LayerContext,
        call: Call,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Return ``(out (B, H, Nq, D), combined map or None)``."""
        raise NotImplementedError

    def merge_into(self, attn: nn.Module) -> None:
        """Fold the method into the base weights of ``attn`` (only DEX and DiffV can)."""
        raise NotMergeableError(f"method '{self.config.name}' cannot be merged into the base weights")

    @property
    def mergeable(self) -> bool:
        return type(self).merge_into is not MethodModule.merge_into

    @classmethod
    def calibrate(cls, model: nn.Module, config: MethodConfig, **kwargs: Any) -> MethodConfig:
        """Resolve data-dependent options on the stock model before patching (default: nothing to resolve)."""
        if kwargs:
            raise TypeError(f"method '{config.name}' takes no extra apply() arguments (got {', '.join(kwargs)})")
        return config

    def extra_repr(self) -> str:
        return f"layer={self.info.index}"
