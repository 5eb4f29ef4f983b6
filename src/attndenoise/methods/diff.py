"""DIFF attention retrofit: the Differential Transformer's two maps on a pretrained model.

Paper: Ye et al., "Differential Transformer", arXiv 2410.05258. Math and decisions: docs/methods.md, section DIFF
retrofit.

``O' = (A1 - lambda A2) V`` with ``A_j = softmax(s Q_j K_j^T)``.

Retrofit (default): ``Q1 = Q``, ``K1 = K`` are the pretrained ones; ``Q2``, ``K2`` come from new projections
``W_Q2``, ``W_K2`` (:class:`~attndenoise.methods.parts.SecondProjections`, copies of ``W_Q``, ``W_K`` taken when the
module is built), so ``A2 = A1`` at init, and with ``lambda(0) = 0`` the model is unchanged. ``K2`` is computed
once per token and cached beside ``K`` (:func:`~attndenoise.methods.base.stack_second_keys`).

Lambda: the common schedule, or with ``lambda_reparam=True`` DIFF's ``exp(lq1 . lk1) - exp(lq2 . lk2) +
lambda_init`` in place of ``lambda_learn`` (:class:`~attndenoise.schedule.ReparamLambda`).

From-scratch options change the model at init, so they are for models trained or converted that way: ``head_norm``
(per-head RMSNorm times ``(1 - lambda_init)``) and ``pairing`` (transformers' ``DiffLlama`` head layout,
:meth:`DIFF._attend_pairs`). With ``pairing``, ``head_norm``, ``lambda_reparam``, ``lambda_init="depth"``,
``anneal_steps=0`` and ``lambda_granularity="layer"`` a Llama model carrying a ``DiffLlama``'s weights computes what
that model computes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .. import attention, registry
from ..config import ConfigError, MethodConfig, boolean, positive
from .base import AttentionCall, LayerContext, LayerInfo, MethodModule, split_second_keys, stack_second_keys
from .parts import SecondProjections


@dataclass
class DIFFConfig(MethodConfig):
    """DIFF retrofit options (docs/methods.md, section DIFF retrofit).

    Attributes:
        pairing: DiffLlama head pairing (head ``i`` with ``i + h/2``, values concatenated); no new projections.
        head_norm: per-head (per-pair) RMSNorm of the output times ``(1 - lambda_init)``.
        norm_eps: epsilon of that norm; ``None`` takes the model's ``rms_norm_eps`` (resolved at apply time).
        lambda_reparam: DIFF's ``exp(lq1.lk1) - exp(lq2.lk2) + lambda_init`` in place of ``lambda_learn``.
        lambda_std: standard deviation of the re-parameterisation vectors at init (DIFF: 0.1).
    """

    name = "diff"
    two_maps = True
    summary = "Differential Transformer retrofit: second Q/K projections copied from W_Q/W_K, O1 - lambda O2"
    pairing: bool = False
    head_norm: bool = False
    norm_eps: float | None = None
    lambda_reparam: bool = False
    lambda_std: float = 0.1

    def validate(self) -> None:
        super().validate()
        for name in ("pairing", "head_norm", "lambda_reparam"):
            boolean(name, getattr(self, name))
        if self.norm_eps is not None:
            positive("norm_eps", self.norm_eps)
        positive("lambda_std", self.lambda_std, allow_zero=True)


def rms_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm without affine weight over the last axis, in float32 (zeros stay zeros: padded rows)."""
    x = x.float()
    return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)


def model_norm_eps(model: nn.Module) -> float:
    """The model's own normalisation epsilon (DiffLlama's output norm uses ``rms_norm_eps``)."""
    cfg = model.config
    for name in ("rms_norm_eps", "layer_norm_epsilon", "layer_norm_eps"):
        eps = getattr(cfg, name, None)
        if isinstance(eps, (int, float)) and eps > 0:
            return float(eps)
    return 1e-5


class DIFF(MethodModule[DIFFConfig]):
    """``(A1 - lambda A2) V`` with a second, cached key set (retrofit) or DiffLlama's head pairs (``pairing``)."""

    caches_kv = True

    def __init__(self, config: DIFFConfig, info: LayerInfo, attn: nn.Module) -> None:
        super().__init__(config, info, attn)
        g = info.geometry
        self.lambda_init = config.lambda_init_for(info.index)
        reparam_std = config.lambda_std if config.lambda_reparam else None
        if config.pairing:
            if g.num_heads % 2 or g.num_kv_heads % 2:
                raise ConfigError(
                    f"pairing=True needs an even number of query heads and of key/value heads (DiffLlama's layout); "
                    f"this model has {g.num_heads} query and {g.num_kv_heads} key/value heads"
                )
            self.lam = self.make_lambda(g.num_heads // 2, reparam_std=reparam_std)
        else:
            self.proj2 = SecondProjections(attn)
            self.lam = self.make_lambda(g.num_heads, reparam_std=reparam_std)

    @classmethod
    def calibrate(cls, model: nn.Module, config: DIFFConfig, **kwargs: Any) -> DIFFConfig:
        """Resolve ``norm_eps`` from the model."""
        super().calibrate(model, config, **kwargs)
        if config.norm_eps is None:
            config = dataclasses.replace(config, norm_eps=model_norm_eps(model))
        return config

    # -- per token ---------------------------------------------------------------------------------------------
    def prepare(self, attn: nn.Module, ctx: LayerContext) -> None:
        if not self.config.pairing:
            ctx.q2, ctx.k2 = self.proj2(attn, ctx.hidden_states, ctx.position_embeddings)

    def store(
        self, attn: nn.Module, key: torch.Tensor, value: torch.Tensor, ctx: LayerContext
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.config.pairing:
            # each pair reads [V_a, V_{a + h_kv/2}]; store that layout (h_kv/2 heads, width 2d)
            m = value.shape[1] // 2
            return key, torch.cat([value[:, :m], value[:, m:]], dim=-1)
        return stack_second_keys(key, ctx), value

    # -- attention ---------------------------------------------------------------------------------------------
    def attend(
        self, attn: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, ctx: LayerContext,
        call: AttentionCall,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.config.pairing:
            return self._attend_pairs(query, key, value, call)
        assert ctx.q2 is not None, "prepare() sets ctx.q2"
        k1, k2 = split_second_keys(key, ctx)
        lam = self.lam()
        o1, o2, p1, p2 = call.two_map_parts(query, k1, ctx.q2.to(query.dtype), k2, value)
        out = self._finish(attention.combine([(1.0, o1), (-lam, o2)], torch.float32))
        pmap = None if p1 is None or p2 is None else p1 - attention.per_head(lam, p1) * p2
        return out.to(value.dtype), pmap

    def _attend_pairs(
        self, query: torch.Tensor, key: torch.Tensor, vpair: torch.Tensor, call: AttentionCall
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """DiffLlama pairing: pair ``i`` = query heads ``(i, i + h/2)`` on key/value heads ``(a, a + h_kv/2)``.

        No new projections: head ``i`` (``i < h/2``) gives ``A1`` and head ``i + h/2`` gives ``A2`` of pair ``i``;
        each pair reads the value ``[V_a, V_{a + h_kv/2}]`` (width ``2d``; the cache holds the values already
        concatenated, ``h_kv/2`` heads of width ``2d``, the same memory, so no per-step copy or GQA repeat is
        needed), ``head_norm`` runs over those ``2d`` channels, and pair ``i`` fills output heads ``2i, 2i+1``.
        The first half of the query heads only ever meets the first half of the key/value heads (and the second
        the second), so each half is one fused GQA call against its key half and the shared paired values.
        """
        b, h, n, d = query.shape
        hp, m = h // 2, key.shape[1] // 2
        out, pmap = call.two_maps(
            query[:, :hp], key[:, :m], query[:, hp:], key[:, m:], vpair, c1=1.0, c2=-self.lam(), dtype=torch.float32
        )
        out = self._finish(out)  # (B, h/2, N, 2d): the norm spans both value halves, as in DiffLlama
        out = out.view(b, hp, n, 2, d).permute(0, 1, 3, 2, 4).reshape(b, h, n, d)  # pair i -> heads 2i, 2i+1
        return out.to(vpair.dtype), pmap

    def _finish(self, out: torch.Tensor) -> torch.Tensor:
        """Optional per-head RMSNorm and ``(1 - lambda_init)`` on a float32 output."""
        if not self.config.head_norm:
            return out
        return rms_norm(out, self.config.norm_eps or 1e-5) * (1.0 - self.lambda_init)


registry.register(DIFFConfig, DIFF)
