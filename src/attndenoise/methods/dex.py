"""DEX, Differential Extension: a per-head transform of each head's output.

Paper: Kong, Jang and Kwak, "Understanding Differential Transformer Unchains Pretrained Self-Attentions",
arXiv 2505.16333 (eq. 2 and 11 of the DAA paper restate it). Math and decisions: docs/methods.md, section DEX.

``O'_i = O_i (I - lambda(t) W_i)`` for each selected head ``i``, ``W_i`` (d x d). One fused attention call; the
extension acts on the per-head output, so after training it folds into ``W_O`` (block-diagonal product) and a
merged model costs nothing extra.

Options: ``init`` identity (as the DAA paper describes DEX) or zero; ``shared`` one matrix for all heads of a layer
(as in a public Megatron-based port); ``head_selection="entropy"`` keeps the ``head_fraction`` of heads with the
highest mean attention entropy on calibration data (the paper selects "a layer-specific subset of heads" by an
unpublished rule; high-entropy heads are the diffuse, noise-prone ones). The selection is resolved once, on the
stock model, and stored in the config (``heads``), so a saved adapter reloads without calibration data.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .. import registry
from ..config import ConfigError, MethodConfig, boolean, choice
from ..families import projection
from .base import AttentionCall, LayerContext, LayerInfo, MethodModule


@dataclass
class DEXConfig(MethodConfig):
    """DEX options.

    Attributes:
        init: ``"identity"`` (default) or ``"zero"`` for ``W_i``.
        shared: one ``W`` shared by the heads of a layer.
        head_selection: ``"all"`` or ``"entropy"`` (needs ``calibration_inputs=`` in :func:`attndenoise.apply`).
        head_fraction: share of heads kept by the entropy rule, in (0, 1].
        heads: resolved selection, layer index (as a string) -> head indices; ``None`` until calibrated.
    """

    name = "dex"
    summary = "per-head d x d transform of each head's output, O (I - lambda W); merges into W_O"
    init: str = "identity"
    shared: bool = False
    head_selection: str = "all"
    head_fraction: float = 0.5
    heads: dict[str, list[int]] | None = None

    def validate(self) -> None:
        super().validate()
        choice("init", self.init, ("identity", "zero"))
        choice("head_selection", self.head_selection, ("all", "entropy"))
        boolean("shared", self.shared)
        if not isinstance(self.head_fraction, (int, float)) or not 0 < self.head_fraction <= 1:
            raise ConfigError(f"head_fraction={self.head_fraction!r}: must be in (0, 1]")
        if self.heads is not None:
            if not isinstance(self.heads, dict):
                raise ConfigError("heads: must map layer indices to lists of head indices")
            self.heads = {str(k): sorted(int(h) for h in v) for k, v in self.heads.items()}

    @property
    def needs_calibration(self) -> bool:
        return self.head_selection == "entropy" and self.heads is None


class DEX(MethodModule[DEXConfig]):
    """Per-head output extension ``O_i (I - lambda W_i)``."""

    mergeable = True

    def __init__(self, config: DEXConfig, info: LayerInfo, attn: nn.Module) -> None:
        super().__init__(config, info, attn)
        g = info.geometry
        n = 1 if config.shared else g.num_heads
        base = torch.eye(g.head_dim) if config.init == "identity" else torch.zeros(g.head_dim, g.head_dim)
        self.weight = nn.Parameter(base.repeat(n, 1, 1))  # (h or 1, d, d)
        selected = torch.ones(g.num_heads)
        if config.heads is not None:
            keep = config.heads.get(str(info.index), [])
            selected = torch.zeros(g.num_heads)
            selected[keep] = 1.0
        self.register_buffer("selected", selected)
        self.lam = self.make_lambda()

    def gains(self) -> torch.Tensor:
        """``lambda_i`` for selected heads, 0 for the others, shape (h,)."""
        return self.lam().expand(self.info.geometry.num_heads) * self.selected.float()

    def attend(
        self, attn: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, ctx: LayerContext,
        call: AttentionCall,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        o, p = call.one_map(query, key, value)
        ext = torch.matmul(o.float(), self.weight.float()[None])  # O_i W_i, (B, H, N, D)
        out = o.float() - self.gains().view(1, -1, 1, 1) * ext
        return out.to(value.dtype), p

    def merge_into(self, attn: nn.Module) -> None:
        # o_proj(O M) with M = blockdiag(I - g_i W_i)  ->  W_O' = W_O M^T, block by block
        w, _ = projection(attn, "o")
        g = self.info.geometry
        eye = torch.eye(g.head_dim)
        gains = self.gains().detach().float()
        wf = w.float().clone()
        for i in range(g.num_heads):
            m = eye - gains[i] * self.weight[i if self.weight.shape[0] > 1 else 0].detach().float()
            cols = slice(i * g.head_dim, (i + 1) * g.head_dim)
            wf[:, cols] = wf[:, cols] @ m.T
        w.copy_(wf.to(w.dtype))

    @classmethod
    def calibrate(cls, model: nn.Module, config: DEXConfig, **kwargs: Any) -> DEXConfig:
        inputs = kwargs.pop("calibration_inputs", None)
        super().calibrate(model, config, **kwargs)
        if config.head_selection != "entropy" or config.heads is not None:
            return config
        if inputs is None:
            raise ConfigError(
                "head_selection='entropy' needs calibration data: apply(model, config, calibration_inputs=ids)"
            )
        entropy = head_entropy(model, inputs)
        keep = max(1, math.ceil(config.head_fraction * entropy.shape[1]))
        heads = {str(layer): sorted(row.topk(keep).indices.tolist()) for layer, row in enumerate(entropy)}
        return dataclasses.replace(config, heads=heads)


@torch.no_grad()
def head_entropy(model: Any, inputs: Any) -> torch.Tensor:
    """Mean attention entropy per (layer, head) of the stock model on ``inputs`` (ids tensor or a dict)."""
    batch = dict(inputs) if isinstance(inputs, dict) else {"input_ids": torch.as_tensor(inputs)}
    if batch["input_ids"].dim() == 1:
        batch["input_ids"] = batch["input_ids"][None]
    original = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        out = model(**batch, output_attentions=True, use_cache=False)
    finally:
        model.set_attn_implementation(original)
    mask = batch.get("attention_mask")
    rows = []
    for att in out.attentions:  # (B, H, N, N)
        ent = -(att.float() * att.float().clamp_min(1e-12).log()).sum(-1)  # (B, H, N)
        if mask is not None:
            valid = mask[:, None, :].to(ent.dtype)
            rows.append((ent * valid).sum((0, 2)) / valid.sum((0, 2)).clamp_min(1))
        else:
            rows.append(ent.mean((0, 2)))
    return torch.stack(rows)


registry.register(DEXConfig, DEX)
