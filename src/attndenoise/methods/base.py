"""What a method supplies to the shared machinery: what differs between methods; the core does the rest.

A method is an ``nn.Module`` attached to one attention layer (as ``attn.attndenoise``), built as
``Method(config, info, attn)`` with the attention module it attaches to, so it can copy what it needs from it (the
DIFF retrofit copies ``W_Q``/``W_K``). The patch machinery (:mod:`attndenoise.patch`) then calls, per forward:

1. :meth:`MethodModule.prepare` before the family's own attention forward, with the layer input and the rotary
   ``(cos, sin)`` (for methods that form a second query/key from the layer input: they put it on the context);
2. :meth:`MethodModule.store` on the *new* keys/values, turning them into what is cached (for methods that cache
   something extra per key or change V; docs/methods.md, section Caching);
3. :meth:`MethodModule.attend` with the query and the whole stored keys/values, instead of the stock attention
   function.

**Store runs exactly once, cache or not**, for a method with ``caches_kv = True`` (and never for one without):
under a KV cache it runs inside the cache's ``update`` (so what it returns is what the cache holds), without a cache
it runs just before :meth:`~MethodModule.attend`. So ``key``/``value`` in ``attend`` are always the stored form, plus
the cached past when there is a cache.

**A second key set rides beside K** (DiffK, DIFF, DINT): :meth:`~MethodModule.prepare` puts ``K2`` on
``ctx.k2``; :func:`stack_second_keys` in ``store`` concatenates it to ``K`` on the head-dim axis, ``(B, Hkv, N, 2d)``,
only under a cache, where it has to travel with its key through cropping, beam reordering and sliding windows;
:func:`split_second_keys` in ``attend`` takes ``(K1, K2)`` back from either form. Without a cache (training) ``K2``
stays on the context: no concatenation, no copy. OpAmp is different on purpose: its adapted ``K1``, ``K2``
*replace* ``K`` (they are computed from it in ``store``), so they are cached concatenated in place of ``K``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, TypeVar

import torch
from torch import nn

from .. import attention
from ..config import MethodConfig
from ..families import Geometry
from ..schedule import LambdaSchedule, schedule_for


class NotMergeableError(TypeError):
    """The method's output is not a fixed linear map of base weights, so it cannot be folded into them."""


@dataclass
class LayerInfo:
    """Where a method module sits."""

    index: int
    num_layers: int
    geometry: Geometry


@dataclass
class LayerContext:
    """Per-forward data of one layer, gathered by the pre-hook and dropped after the attention call.

    Attributes:
        hidden_states: the layer input ``(B, N, d_model)`` of the new tokens.
        position_embeddings: the rotary ``(cos, sin)`` of the new tokens, or ``None`` (no RoPE).
        has_cache: a KV-cache object was passed to this forward (so ``store`` runs inside its ``update``).
        q2: a second query ``(B, H, N, d)`` of the new tokens, set by ``prepare`` (DiffQ, DIFF, DINT).
        k2: a second key ``(B, Hkv, N, d)`` of the new tokens, set by ``prepare`` (DiffK, DIFF, DINT; see
            :func:`stack_second_keys`).
        dv: DiffV's value change ``(X W_D) W_V`` of the new tokens, set by ``prepare``, used by ``store``.
    """

    hidden_states: torch.Tensor
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None
    has_cache: bool
    q2: torch.Tensor | None = None
    k2: torch.Tensor | None = None
    dv: torch.Tensor | None = None

    @property
    def cached(self) -> bool:
        """Deprecated name of :attr:`has_cache` (it never meant "these keys came from the cache")."""
        warnings.warn("LayerContext.cached is deprecated; use LayerContext.has_cache", DeprecationWarning,
                      stacklevel=2)
        return self.has_cache


def stack_second_keys(key: torch.Tensor, ctx: LayerContext) -> torch.Tensor:
    """What ``store`` caches for a method with a second key set: ``[K, K2]`` on the head-dim axis under a cache,
    ``K`` alone without one (``K2`` stays on ``ctx``; module docstring)."""
    if not ctx.has_cache:
        return key
    assert ctx.k2 is not None, "prepare() sets ctx.k2"
    return torch.cat([key, ctx.k2.to(key.dtype)], dim=-1)


def split_second_keys(key: torch.Tensor, ctx: LayerContext) -> tuple[torch.Tensor, torch.Tensor]:
    """``(K1, K2)`` from what :func:`stack_second_keys` stored (plus the cached past under a cache)."""
    if ctx.has_cache:
        k1, k2 = key.chunk(2, dim=-1)
        return k1, k2
    assert ctx.k2 is not None, "prepare() sets ctx.k2"
    return key, ctx.k2.to(key.dtype)


@dataclass
class AttentionCall:
    """The arguments of one attention call, with the fast/reference switch applied uniformly (docs/methods.md,
    section Fused fast path): methods call these and never choose a path themselves."""

    mask: torch.Tensor | None
    scaling: float | None
    dropout: float
    causal: bool
    softcap: float | None
    eager: bool

    def one_map(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``A V`` -> ``(out, map or None)`` (:func:`attndenoise.attention.one_map`)."""
        return attention.one_map(
            q, k, v, mask=self.mask, scaling=self.scaling, dropout=self.dropout, causal=self.causal,
            softcap=self.softcap, eager=self.eager,
        )

    def two_maps(
        self, q1: torch.Tensor, k1: torch.Tensor, q2: torch.Tensor, k2: torch.Tensor, v: torch.Tensor, *,
        c1: attention.Coef, c2: attention.Coef, dtype: torch.dtype | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(c1 A1 + c2 A2) V`` -> ``(out, combined map or None)``; ``dtype`` of ``out`` defaults to ``v``'s
        (float32 for a method that normalises the output afterwards)."""
        return self.mixed_maps(q1, k1, q2, k2, v, mix=attention.linear_mix(c1, c2), dtype=dtype)

    def mixed_maps(
        self, q1: torch.Tensor, k1: torch.Tensor, q2: torch.Tensor, k2: torch.Tensor, v: torch.Tensor, *,
        mix: attention.Mix, dtype: torch.dtype | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``mix(A1, A2) V`` for a ``mix`` linear in both maps (:func:`attndenoise.attention.two_map_attention`)."""
        return attention.two_map_attention(
            q1, k1, q2, k2, v, mix=mix, mask=self.mask, scaling=self.scaling, dropout=self.dropout,
            causal=self.causal, softcap=self.softcap, eager=self.eager, dtype=dtype,
        )

    def two_map_parts(
        self, q1: torch.Tensor, k1: torch.Tensor, q2: torch.Tensor, k2: torch.Tensor, v: torch.Tensor, *,
        scaling2: float | None = None,
    ) -> attention.TwoMapParts:
        """``O1``, ``O2`` (and the maps on the reference path) kept apart
        (:func:`attndenoise.attention.two_map_parts`)."""
        return attention.two_map_parts(
            q1, k1, q2, k2, v, mask=self.mask, scaling=self.scaling, scaling2=scaling2, dropout=self.dropout,
            causal=self.causal, softcap=self.softcap, eager=self.eager,
        )

    def valid_rows(self, nq: int, nk: int, device: torch.device) -> torch.Tensor | None:
        """(B, 1, Nq, 1) float32: 1 for queries that see at least one key, 0 for left padding; ``None``: all valid."""
        m, _ = attention.resolve_mask(self.mask, nq, nk, self.causal, device)
        rows = attention.valid_rows(m)
        return None if rows is None else rows.float()


C = TypeVar("C", bound=MethodConfig)


class MethodModule(nn.Module, Generic[C]):
    """Base class of every method's per-layer module, generic over its config class."""

    config: C
    #: True when :meth:`store` changes what enters the KV cache (then it runs exactly once per forward).
    caches_kv: ClassVar[bool] = False
    #: True when :meth:`merge_into` can fold the trained method into the base weights (DEX, DiffV).
    mergeable: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.mergeable and cls.merge_into is MethodModule.merge_into:
            raise TypeError(f"{cls.__name__} says mergeable = True but does not implement merge_into")

    def __init__(self, config: C, info: LayerInfo, attn: nn.Module) -> None:
        super().__init__()
        self.config = config
        self.info = info

    def make_lambda(self, heads: int | None = None, *, reparam_std: float | None = None) -> LambdaSchedule:
        """The lambda schedule (docs/methods.md, section Lambda schedule) with this config's granularity and this
        layer's ``lambda_init``; ``heads`` is the number of per-head values (default: query heads).
        ``reparam_std`` given: DIFF's re-parameterised lambda, vectors of length ``head_dim`` drawn with it."""
        g = self.info.geometry
        num = heads or g.num_heads
        if reparam_std is None:
            return schedule_for(self.config, self.info.index, num)
        return schedule_for(self.config, self.info.index, num, reparam_dim=g.head_dim, reparam_std=reparam_std)

    def prepare(self, attn: nn.Module, ctx: LayerContext) -> None:
        """Compute per-new-token quantities from the layer input (default: nothing)."""

    def check_cache(self, attn: nn.Module, cache: Any) -> None:
        """Raise when this method cannot run with ``cache`` (default: every cache works)."""

    def store(
        self, attn: nn.Module, key: torch.Tensor, value: torch.Tensor, ctx: LayerContext
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Turn the new keys/values into what is cached (default: unchanged). Runs only when ``caches_kv``."""
        return key, value

    def attend(
        self, attn: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, ctx: LayerContext,
        call: AttentionCall,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Return ``(out (B, H, Nq, D), combined map or None)``."""
        raise NotImplementedError

    def merge_into(self, attn: nn.Module) -> None:
        """Fold the method into the base weights of ``attn`` (only methods with ``mergeable = True`` can)."""
        raise NotMergeableError(f"method '{self.config.name}' cannot be merged into the base weights")

    @classmethod
    def calibrate(cls, model: nn.Module, config: C, **kwargs: Any) -> C:
        """Resolve data- or model-dependent options on the stock model before patching (default: nothing to
        resolve); per-layer copies of base weights belong in ``__init__``, which gets the attention module."""
        if kwargs:
            raise TypeError(f"method '{config.name}' takes no extra apply() arguments (got {', '.join(kwargs)})")
        return config

    def extra_repr(self) -> str:
        return f"layer={self.info.index}"


def __getattr__(name: str) -> Any:
    if name == "Call":  # renamed: the name said nothing about what it holds
        warnings.warn("attndenoise.methods.base.Call is deprecated; use AttentionCall", DeprecationWarning,
                      stacklevel=2)
        return AttentionCall
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
