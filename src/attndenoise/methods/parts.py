"""Building blocks more than one method uses; none of them is a method (nothing here is registered)."""

from __future__ import annotations

import torch
from torch import nn

from ..families import effective_projection, project, rope


class SecondProjections(nn.Module):
    """``W_Q2``, ``W_K2`` (+ biases where the family has them): copies of the layer's ``W_Q``, ``W_K`` at init, so
    a second map built from them equals the stock map (the DIFF retrofit and DINT; docs/methods.md, section DIFF
    retrofit).

    Under a peft adapter (LoRA) the copy is of the *effective* projection (base + LoRA), so ``A2 = A1`` at init in
    either order of wrapping; afterwards the copy is the method's own parameter, so a later LoRA merge does not
    change it.
    """

    q_weight: nn.Parameter
    q_bias: nn.Parameter | None
    k_weight: nn.Parameter
    k_bias: nn.Parameter | None

    def __init__(self, attn: nn.Module) -> None:
        super().__init__()
        with torch.no_grad():
            for which in ("q", "k"):
                w, b = effective_projection(attn, which)  # detached clones
                self.register_parameter(f"{which}_weight", nn.Parameter(w))
                self.register_parameter(f"{which}_bias", None if b is None else nn.Parameter(b))

    def forward(
        self, attn: nn.Module, x: torch.Tensor, pos: tuple[torch.Tensor, torch.Tensor] | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotated ``(Q2 (B, h, N, d), K2 (B, h_kv, N, d))`` of the layer input ``x``, through the family's
        ``q_norm``/``k_norm`` and rotary embedding like the stock query/key."""
        q2 = project(attn, x, "q", weights=(self.q_weight, self.q_bias))
        k2 = project(attn, x, "k", weights=(self.k_weight, self.k_bias))
        return rope(attn, q2, pos), rope(attn, k2, pos)
