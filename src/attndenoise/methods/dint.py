"""DINT and low-rank DINT: differential attention plus an integral term from the mean of the first map.

Papers: Cang et al., "DINT Transformer", arXiv 2501.17486; low-rank DINT from the slides "Low rank attention
denoising" (Okhotnikov, MIPT 2025). Math and decisions: docs/methods.md, sections DINT and Low-rank DINT.

``O' = (lambda A3 + A1 - lambda A2) V``.

``A3`` as printed repeats the column mean of ``A1`` over all rows, which lets a row see future keys. For decoder
LMs (default, ``causal_integral=True``) ``A3[i] = (1/c_i) sum_{j <= i, j valid} A1[j]``: the mean of the rows of
``A1`` so far, lower triangular, rows summing to 1, and ``A3 V = cummean(O1)``. So

    ``O' = lambda cummean(O1) + O1 - lambda O2``

with two fused attention calls and a running sum: no N x N matrix. Left-padding rows (queries that see no key) are
left out of both the sum and the count ``c_i``, so a padded example computes what it computes alone.
``causal_integral=False`` keeps the printed form (mean over all valid rows, for encoders); it cannot decode with a
KV cache. While decoding, the running sum lives inside the KV cache (see the comment above :func:`state_width`).

Second map:

* DINT: ``W_Q2``, ``W_K2`` are new projections initialised as copies of ``W_Q``, ``W_K`` (as in the DIFF retrofit:
  :class:`~attndenoise.methods.parts.SecondProjections`), so ``A2 = A1``, ``A3 V = cummean(O1)`` and with
  ``lambda(0) = 0`` the model is unchanged at init. ``K2`` is cached beside ``K``
  (:func:`~attndenoise.methods.base.stack_second_keys`).
* Low-rank DINT: ``Q2 = X W_Q2_down W_Q2_up``, ``K2 = X W_K2_down W_K2_up``, with their *own* down/up pair for
  queries and for keys (``W_down`` d_model x r, ``W_up`` r x (heads d)). Rotated like ``Q1``/``K1`` by default
  (``rotary=False`` leaves them unrotated); no bias and no ``q_norm``/``k_norm``. ``W_down`` is drawn like a default
  linear layer, ``W_up`` is zero, so ``A2`` starts uniform over the visible keys and lambda must start at 0.
  Temperature of ``A2``: ``temperature="d81"`` uses ``sqrt(d/81)``, i.e. scale ``9 s`` with ``s`` the layer's own
  scale; ``"sqrt_d"`` uses ``s``.

Lambda: the common schedule, or DIFF's re-parameterisation (``lambda_reparam=True``,
:class:`~attndenoise.schedule.ReparamLambda`); either way ``lambda(0) = 0`` when ``anneal_steps > 0``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from .. import attention, registry
from ..config import ConfigError, MethodConfig, boolean, choice, positive
from ..families import rope
from ..schedule import LambdaSchedule
from .base import AttentionCall, LayerContext, LayerInfo, MethodModule, split_second_keys, stack_second_keys
from .parts import SecondProjections

# -- the causal integral state in the value cache -------------------------------------------------------------------
#
# The running sum covers *all* earlier valid positions, also those a sliding window no longer shows, so it cannot be
# recomputed from the cache. Each position's prefix sum of O1 (its group's g query heads, g*d channels) and its valid
# count are stored as extra channels of the cached *value* of its key/value head: DINT.store appends zero
# placeholders, DINT.attend fills them once O1 is known. The tensor a dynamic cache layer returns from `update` is its
# own storage (DynamicSlidingWindowLayer keeps a view of it), so the write lands in the cache; cropping, beam
# reordering and window trimming then keep each position's state with its key, and the state for the next token is
# always the last cached position's. The state is float32 whatever the model dtype: in a 16-bit cache it is stored
# bit for bit as pairs of 16-bit channels (a bf16 count would stop being exact at 257). Cost: g*d + 1 extra value
# channels per key/value head (twice that in 16-bit caches), padded to a multiple of 8 channels per cached row.
# Static and quantized caches are refused (DINT.check_cache). Training runs through the same code without a cache;
# with a cache and gradients enabled, O1 is computed from a copy of V so that the in-place write cannot invalidate
# saved tensors. See docs/methods.md, section DINT.


def _state_dtype(dtype: torch.dtype) -> torch.dtype:
    # float32 at least: sums and counts of long prefixes need it (docs/methods.md, section Float32 combination)
    return dtype if torch.finfo(dtype).bits >= 32 else torch.float32


def state_width(num_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    """Channels the state occupies per key/value head: ``g*d`` prefix-sum channels + 1 count, in units of ``dtype``
    (two per float32 in a 16-bit cache)."""
    n = num_heads // num_kv_heads * head_dim + 1
    return n * (torch.finfo(_state_dtype(dtype)).bits // torch.finfo(dtype).bits)


def state_channels(num_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    """Value channels appended per key/value head: the state, padded so that a cached value row is a multiple of 8
    elements (fused GPU kernels want aligned strides for the ``V = value[..., :d]`` view they read)."""
    width = head_dim + state_width(num_heads, num_kv_heads, head_dim, dtype)
    return -(-width // 8) * 8 - head_dim


def _pack(state: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float32/64 state -> the cache's dtype, bit for bit (16-bit caches hold each float32 in two channels)."""
    state = state.to(_state_dtype(dtype)).contiguous()
    return state if state.dtype == dtype else state.view(dtype)


def _unpack(stored: torch.Tensor) -> torch.Tensor:
    sd = _state_dtype(stored.dtype)
    stored = stored.contiguous()
    return stored if sd == stored.dtype else stored.view(sd)


def read_state(value: torch.Tensor, nq: int, num_heads: int, d: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Prefix sum ``(B, H, 1, d)`` and valid count ``(B, 1, 1, 1)`` at the cached position before the ``nq`` new
    ones, or ``None`` when there is none (first forward)."""
    b, hkv, nk, _ = value.shape
    if nk <= nq:
        return None
    g = num_heads // hkv
    width = state_width(num_heads, hkv, d, value.dtype)
    st = _unpack(value.detach()[:, :, nk - nq - 1, d : d + width]).float()  # (B, Hkv, g*d + 1)
    s = st[..., : g * d].reshape(b, hkv * g, 1, d)
    c = st[:, :1, -1:].reshape(b, 1, 1, 1)
    return s, c


def write_state(value: torch.Tensor, s: torch.Tensor, c: torch.Tensor) -> None:
    """Store the prefix sums ``s`` (B, H, Nq, d) and counts ``c`` (B, 1, Nq, 1) of the new positions into the
    placeholder channels of ``value`` (the cache's own storage), in place and outside autograd."""
    b, h, nq, d = s.shape
    hkv = value.shape[1]
    g = h // hkv
    st = s.detach().reshape(b, hkv, g, nq, d).permute(0, 1, 3, 2, 4).reshape(b, hkv, nq, g * d)
    st = torch.cat([st, c.detach().to(st.dtype).expand(b, hkv, nq, 1)], dim=-1)
    packed = _pack(st, value.dtype)
    value.detach()[:, :, -nq:, d : d + packed.shape[-1]].copy_(packed)


# -- configs -------------------------------------------------------------------------------------------------------


@dataclass
class DINTConfig(MethodConfig):
    """DINT options (docs/methods.md, section DINT).

    Attributes:
        causal_integral: ``True`` (default): ``A3`` = causal running row mean of ``A1`` (decoders);
            ``False``: the printed column mean repeated over rows (encoders; no KV-cache decoding).
        lambda_reparam: DIFF's re-parameterised lambda in place of ``lambda_learn``
            (:class:`~attndenoise.schedule.ReparamLambda`).
        lambda_std: standard deviation of the re-parameterisation vectors at init.
    """

    name = "dint"
    two_maps = True
    summary = "differential attention plus an integral term from the causal mean of the first map"
    causal_integral: bool = True
    lambda_reparam: bool = False
    lambda_std: float = 0.1

    def validate(self) -> None:
        super().validate()
        boolean("causal_integral", self.causal_integral)
        boolean("lambda_reparam", self.lambda_reparam)
        positive("lambda_std", self.lambda_std, allow_zero=True)


@dataclass
class LowRankDINTConfig(DINTConfig):
    """Low-rank DINT options (docs/methods.md, section Low-rank DINT).

    Attributes:
        rank: ``r`` of ``W_down`` (d_model x r) / ``W_up`` (r x heads*d), separate for queries and keys.
        temperature: ``"d81"`` (``sqrt(d/81)``, the slides' variance argument) or ``"sqrt_d"`` (the layer's own).
        rotary: rotate ``Q2``/``K2`` with the model's RoPE like ``Q1``/``K1``.
    """

    name = "lowrank_dint"
    summary = "DINT with rank-r second projections"
    rank: int = 16
    temperature: str = "d81"
    rotary: bool = True

    def validate(self) -> None:
        super().validate()
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 1:
            raise ConfigError(f"rank={self.rank!r}: must be an integer >= 1")
        choice("temperature", self.temperature, ("d81", "sqrt_d"))
        boolean("rotary", self.rotary)


# -- modules -------------------------------------------------------------------------------------------------------

#: cache (layer) classes whose ``update`` returns its own storage, concatenated in position order (see above)
_DYNAMIC_CACHES = ("DynamicCache", "DynamicLayer", "DynamicSlidingWindowLayer")


D = TypeVar("D", bound=DINTConfig)


class _Integral(MethodModule[D]):
    """What DINT and low-rank DINT share: ``lambda A3 V + O1 - lambda O2`` and the decoding state. A subclass
    builds its second map (``__init__``, :meth:`second_qk`, :meth:`scaling2`) and ``self.lam``."""

    caches_kv = True
    lam: LambdaSchedule

    def second_qk(self, attn: nn.Module, ctx: LayerContext) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotated ``Q2 (B, h, N, d)``, ``K2 (B, h_kv, N, d)`` of the new tokens."""
        raise NotImplementedError

    def scaling2(self, call: AttentionCall, d: int) -> float | None:
        """Scale of ``A2`` (``None``: the layer's own)."""
        return None

    # -- per token ---------------------------------------------------------------------------------------------
    def check_cache(self, attn: nn.Module, cache: Any) -> None:
        """Refuse static and quantized caches: the running state is written into the storage a dynamic layer's
        ``update`` returns and read at the last cached position, which a static layer (keys padded to its full
        length) or a quantized one (re-encoded values) does not provide: they gave wrong logits, not an error
        (docs/decisions.md, section methods/dint.py)."""
        layers = getattr(cache, "layers", None) or []
        idx = getattr(attn, "layer_idx", None)
        layer = layers[idx] if isinstance(idx, int) and idx < len(layers) else None
        kind = type(layer if layer is not None else cache).__name__
        if kind not in _DYNAMIC_CACHES:
            raise ValueError(
                f"method '{self.config.name}' keeps its integral state inside the KV cache, which works with dynamic "
                f"caches only; this layer's cache is a {kind} (static or quantized). Use the default cache: drop "
                "cache_implementation='static' (or pass a DynamicCache)"
            )

    def prepare(self, attn: nn.Module, ctx: LayerContext) -> None:
        ctx.q2, ctx.k2 = self.second_qk(attn, ctx)

    def store(
        self, attn: nn.Module, key: torch.Tensor, value: torch.Tensor, ctx: LayerContext
    ) -> tuple[torch.Tensor, torch.Tensor]:
        key = stack_second_keys(key, ctx)
        if not ctx.has_cache:  # training / no cache: no decoding state to keep
            return key, value
        g = self.info.geometry
        extra = state_channels(g.num_heads, g.num_kv_heads, value.shape[-1], value.dtype)
        holder = value.new_zeros(*value.shape[:-1], extra)  # filled by attend once O1 is known
        return key, torch.cat([value, holder], dim=-1)

    # -- attention ---------------------------------------------------------------------------------------------
    def attend(
        self, attn: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, ctx: LayerContext,
        call: AttentionCall,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        assert ctx.q2 is not None, "prepare() sets ctx.q2"
        b, h, nq, d = query.shape
        nk = key.shape[-2]
        k1, k2 = split_second_keys(key, ctx)
        v = value
        if ctx.has_cache:
            v = value[..., :d]
            if torch.is_grad_enabled():
                v = v.clone()  # the state write below bumps the cache's version counter; keep V saved intact
        o1, o2, p1, p2 = call.two_map_parts(query, k1, ctx.q2.to(query.dtype), k2, v, scaling2=self.scaling2(call, d))
        valid = call.valid_rows(nq, nk, query.device)
        lam = self.lam()
        o1f = o1.float()
        weighted = o1f if valid is None else o1f * valid
        ones = torch.ones(1, 1, nq, 1, device=query.device) if valid is None else valid
        pmap = None
        if self.config.causal_integral:
            s, c = weighted.cumsum(dim=-2), ones.cumsum(dim=-2)
            prev = read_state(value, nq, h, d) if ctx.has_cache else None
            if prev is not None:
                s, c = s + prev[0], c + prev[1]
            if ctx.has_cache:
                write_state(value, s, c)
            integral = s / c.clamp(min=1.0)
            if p1 is not None and p2 is not None and prev is None:
                a3 = (p1 * ones).cumsum(dim=-2) / c.clamp(min=1.0)
                pmap = self._combined_map(lam, a3, p1, p2)
        else:
            if ctx.has_cache and nk > nq:
                raise ValueError(
                    "causal_integral=False (the printed, non-causal A3) averages over the whole sequence, so it "
                    "cannot decode token by token with a KV cache; use causal_integral=True for generation"
                )
            count = ones.sum(dim=-2, keepdim=True).clamp(min=1.0)
            integral = (weighted.sum(dim=-2, keepdim=True) / count).expand_as(o1f)
            if p1 is not None and p2 is not None:
                a3 = ((p1 * ones).sum(dim=-2, keepdim=True) / count).expand_as(p1)
                pmap = self._combined_map(lam, a3, p1, p2)
        out = attention.combine([(lam, integral), (1.0, o1f), (-lam, o2)], v.dtype)
        return out, pmap

    @staticmethod
    def _combined_map(lam: torch.Tensor, a3: torch.Tensor, p1: torch.Tensor, p2: torch.Tensor) -> torch.Tensor:
        """``lambda A3 + A1 - lambda A2`` (reference path; with a cached past the rows of A3 are unknown: None)."""
        lh = attention.per_head(lam, p1)
        return lh * a3 + p1 - lh * p2


class DINT(_Integral[DINTConfig]):
    """``lambda A3 V + O1 - lambda O2`` with the second map from copies of ``W_Q``/``W_K``."""

    def __init__(self, config: DINTConfig, info: LayerInfo, attn: nn.Module) -> None:
        super().__init__(config, info, attn)
        self.proj2 = SecondProjections(attn)
        self.lam = self.make_lambda(reparam_std=config.lambda_std if config.lambda_reparam else None)

    def second_qk(self, attn: nn.Module, ctx: LayerContext) -> tuple[torch.Tensor, torch.Tensor]:
        q2, k2 = self.proj2(attn, ctx.hidden_states, ctx.position_embeddings)
        return q2, k2


class LowRankDINT(_Integral[LowRankDINTConfig]):
    """DINT with ``Q2 = X W_down W_up``, ``K2 = X W_down W_up`` (separate pairs for queries and keys)."""

    def __init__(self, config: LowRankDINTConfig, info: LayerInfo, attn: nn.Module) -> None:
        super().__init__(config, info, attn)
        g = info.geometry
        r, dm = config.rank, g.hidden_size
        bound = 1.0 / math.sqrt(dm)
        self.q_down = nn.Parameter(torch.empty(r, dm).uniform_(-bound, bound))  # (out, in) like nn.Linear
        self.q_up = nn.Parameter(torch.zeros(g.num_heads * g.head_dim, r))
        self.k_down = nn.Parameter(torch.empty(r, dm).uniform_(-bound, bound))
        self.k_up = nn.Parameter(torch.zeros(g.num_kv_heads * g.head_dim, r))
        self.lam = self.make_lambda(reparam_std=config.lambda_std if config.lambda_reparam else None)

    def second_qk(self, attn: nn.Module, ctx: LayerContext) -> tuple[torch.Tensor, torch.Tensor]:
        x = ctx.hidden_states
        d = self.info.geometry.head_dim

        def low_rank(down: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
            y = F.linear(F.linear(x, down.to(x.dtype)), up.to(x.dtype))
            return y.view(*x.shape[:-1], -1, d).transpose(1, 2)

        q2, k2 = low_rank(self.q_down, self.q_up), low_rank(self.k_down, self.k_up)
        if self.config.rotary:
            q2, k2 = rope(attn, q2, ctx.position_embeddings), rope(attn, k2, ctx.position_embeddings)
        return q2, k2

    def scaling2(self, call: AttentionCall, d: int) -> float | None:
        if self.config.temperature == "sqrt_d":
            return None
        s = call.scaling if call.scaling is not None else d**-0.5
        return 9.0 * s  # 1/sqrt(d/81) = 9/sqrt(d)


registry.register(DINTConfig, DINT)
registry.register(LowRankDINTConfig, LowRankDINT)
