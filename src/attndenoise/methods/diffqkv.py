"""DiffQ, DiffK and DiffV: a transformed layer input for a second query, key set or value.

Paper: "Revisiting Differential Attention: A Fine-Tuning Perspective on Practical Noise Mitigation" (under review,
no arXiv id), section 3.3 and Listings 2-4. Math and decisions: docs/methods.md, section DiffQ, DiffK, DiffV.

One matrix ``W_D`` (d_model x d_model) per layer, identity at init, applied to the layer input before a pretrained
projection (row-vector convention: ``X W_D``):

* DiffQ: ``Q2 = R((X W_D) W_Q)``; ``O' = O(Q1, K, V) - lambda O(Q2, K, V)`` (one fused call, keys shared).
* DiffK: ``K2 = R((X W_D) W_K)``; ``O' = O(Q, K1, V) - lambda O(Q, K2, V)``; ``K2`` is stored in the KV cache beside
  ``K`` (:func:`~attndenoise.methods.base.stack_second_keys`), never recomputed over the prefix.
* DiffV: ``V' = X (I - lambda W_D) W_V``; one attention call, the changed ``V'`` is what gets cached; after training
  it merges into ``W_V``.

The three share one file because they are one method applied to three projections.

``W_Q``/``W_K``/``W_V`` are the layer's *effective* projection: under a peft adapter (LoRA) the wrapped projection is
called (:func:`attndenoise.families.project`), so the second query/key/value include the LoRA exactly as the stock
ones do, the LoRA gets gradients through them too, and ``merge_and_unload()`` leaves the outputs unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from .. import registry
from ..config import MethodConfig
from ..families import project, projection, rope
from .base import AttentionCall, LayerContext, LayerInfo, MethodModule, split_second_keys, stack_second_keys


@dataclass
class DiffQConfig(MethodConfig):
    """DiffQ: second query from the transformed layer input."""

    name = "diffq"
    two_maps = True
    summary = "second query from the transformed layer input X W_D; O1 - lambda O2"


@dataclass
class DiffKConfig(MethodConfig):
    """DiffK: second key set from the transformed layer input (cached)."""

    name = "diffk"
    two_maps = True
    summary = "second key set from X W_D, cached beside K; O1 - lambda O2"


@dataclass
class DiffVConfig(MethodConfig):
    """DiffV: values from ``X (I - lambda W_D)``; mergeable into ``W_V``."""

    name = "diffv"
    summary = "values from X (I - lambda W_D); one attention call, merges into W_V"


C = TypeVar("C", bound=MethodConfig)


class _InputTransform(MethodModule[C]):
    """Holds ``W_D`` (identity init) and lambda."""

    def __init__(self, config: C, info: LayerInfo, attn: nn.Module) -> None:
        super().__init__(config, info, attn)
        self.weight = nn.Parameter(torch.eye(info.geometry.hidden_size))  # W_D
        self.lam = self.make_lambda(self.lambda_heads)

    #: how many per-head lambdas (query heads; DiffV's act on the key/value heads)
    @property
    def lambda_heads(self) -> int:
        return self.info.geometry.num_heads

    def transformed_input(self, ctx: LayerContext) -> torch.Tensor:
        x = ctx.hidden_states
        return torch.matmul(x, self.weight.to(x.dtype))


class DiffQ(_InputTransform[DiffQConfig]):
    def prepare(self, attn: nn.Module, ctx: LayerContext) -> None:
        q2 = project(attn, self.transformed_input(ctx), "q")
        ctx.q2 = rope(attn, q2, ctx.position_embeddings)

    def attend(
        self, attn: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, ctx: LayerContext,
        call: AttentionCall,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        assert ctx.q2 is not None, "prepare() sets ctx.q2"
        return call.two_maps(query, key, ctx.q2, key, value, c1=1.0, c2=-self.lam())


class DiffK(_InputTransform[DiffKConfig]):
    caches_kv = True

    def prepare(self, attn: nn.Module, ctx: LayerContext) -> None:
        k2 = project(attn, self.transformed_input(ctx), "k")
        ctx.k2 = rope(attn, k2, ctx.position_embeddings)

    def store(
        self, attn: nn.Module, key: torch.Tensor, value: torch.Tensor, ctx: LayerContext
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return stack_second_keys(key, ctx), value

    def attend(
        self, attn: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, ctx: LayerContext,
        call: AttentionCall,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        k1, k2 = split_second_keys(key, ctx)
        return call.two_maps(query, k1, query, k2, value, c1=1.0, c2=-self.lam())


class DiffV(_InputTransform[DiffVConfig]):
    caches_kv = True
    mergeable = True

    @property
    def lambda_heads(self) -> int:
        # V is per key/value head: under GQA a per-query-head lambda has no meaning there.
        return self.info.geometry.num_kv_heads

    def _lam_kv(self) -> torch.Tensor:
        return self.lam().reshape(1, -1, 1, 1)

    def prepare(self, attn: nn.Module, ctx: LayerContext) -> None:
        # (X W_D) W_V without the bias: V' = V - lambda (X W_D) W_V
        ctx.dv = project(attn, self.transformed_input(ctx), "v", bias=False)

    def store(
        self, attn: nn.Module, key: torch.Tensor, value: torch.Tensor, ctx: LayerContext
    ) -> tuple[torch.Tensor, torch.Tensor]:
        assert ctx.dv is not None, "prepare() sets ctx.dv"
        v = value.float() - self._lam_kv() * ctx.dv.float()
        return key, v.to(value.dtype)

    def attend(
        self, attn: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, ctx: LayerContext,
        call: AttentionCall,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        return call.one_map(query, key, value)

    def merge_into(self, attn: nn.Module) -> None:
        w, _ = projection(attn, "v")  # (out, in) view of the live weight
        lam = self.lam().detach().float()
        d = self.info.geometry.head_dim
        per_row = lam.repeat_interleave(d) if lam.numel() > 1 else lam.expand(w.shape[0])
        # W_V' = W_V - lambda W_V W_D^T, row r scaled by its head's lambda
        delta = F.linear(w.float(), self.weight.float())  # W_V @ W_D^T
        w.copy_((w.float() - per_row[:, None] * delta).to(w.dtype))


registry.register(DiffQConfig, DiffQ)
registry.register(DiffKConfig, DiffK)
registry.register(DiffVConfig, DiffV)
