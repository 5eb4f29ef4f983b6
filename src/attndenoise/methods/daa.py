"""DAA, Differential Attention Adaption: a per-head query transform and the difference of two maps.

Paper: "Revisiting Differential Attention: A Fine-Tuning Perspective on Practical Noise Mitigation" (under review,
no arXiv id), section 3.2 and Listing 1. Math and decisions: docs/methods.md, section DAA.

Per query head ``i`` a matrix ``W_i`` (d x d), identity at init:
``A1 = softmax(s Q K^T)``, ``A2 = softmax(s (Q W) K^T)``, ``O' = O1 - lambda(t) O2``.

With RoPE the default forms the second query *before* the rotation, ``Q2 = R(Q_pre W)``, so it stays a valid rotary
query against the cached rotated keys. The pre-rotary query is recovered from the rotated one by the inverse
rotation (:func:`attndenoise.families.unrope`), which costs a few element-wise ops instead of a second projection.
``where="post_rope"`` applies ``W`` to the rotated query (the literal reading for rotary models).
Keys, values and the KV cache are the stock ones: one fused call with 2h query heads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .. import registry
from ..config import MethodConfig, choice
from ..families import rope, unrope
from .base import AttentionCall, LayerContext, LayerInfo, MethodModule


@dataclass
class DAAConfig(MethodConfig):
    """DAA options.

    Attributes:
        where: ``"pre_rope"`` (default: the transform acts on the query before RoPE) or ``"post_rope"`` (after it).
    """

    name = "daa"
    two_maps = True
    summary = "per-head d x d query transform; O1 - lambda O2 with a second map from the transformed query"
    where: str = "pre_rope"

    def validate(self) -> None:
        super().validate()
        choice("where", self.where, ("pre_rope", "post_rope"))


class DAA(MethodModule[DAAConfig]):
    """Per-head query transform and the two-map difference."""

    def __init__(self, config: DAAConfig, info: LayerInfo, attn: nn.Module) -> None:
        super().__init__(config, info, attn)
        g = info.geometry
        self.weight = nn.Parameter(torch.eye(g.head_dim).repeat(g.num_heads, 1, 1))  # (h, d, d)
        self.lam = self.make_lambda()

    def second_query(self, attn: nn.Module, query: torch.Tensor, ctx: LayerContext) -> torch.Tensor:
        w = self.weight.to(query.dtype)
        if self.config.where == "post_rope":
            return torch.matmul(query, w[None])
        pre = unrope(attn, query, ctx.position_embeddings)
        return rope(attn, torch.matmul(pre, w[None]), ctx.position_embeddings)

    def attend(
        self, attn: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, ctx: LayerContext,
        call: AttentionCall,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        q2 = self.second_query(attn, query, ctx)
        return call.two_maps(query, key, q2, key, value, c1=1.0, c2=-self.lam())


registry.register(DAAConfig, DAA)
