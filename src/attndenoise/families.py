"""Model families: where each supported architecture keeps its projections, norms and rotary embedding.

Methods that form a second query or key from the layer input (DiffQ, DiffK, DIFF, DINT, ...) or fold into base
weights (DEX, DiffV) need the per-head projections ``W_Q``, ``W_K``, ``W_V``, ``W_O`` in one layout. This module is
the single place that knows how each family stores them (separate ``nn.Linear``, fused ``qkv_proj``, GPT-2's
``Conv1D``). Rotary embedding is always the family's own ``apply_rotary_pos_emb``, looked up in its modelling module,
so partial rotary (Phi-3) and any scaling behave exactly as in the stock model.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .wrappers import is_adapted

#: a transformers attention module: its attributes differ per family, so it is typed ``Any``
AttnModule = Any


class UnsupportedModelError(TypeError):
    """The model's attention is not one of the supported families."""


@dataclass(frozen=True)
class Family:
    """How one architecture lays out its attention projections.

    ``layout`` is ``"split"`` (q_proj/k_proj/v_proj/o_proj), ``"fused"`` (Phi-3 qkv_proj + o_proj) or ``"conv1d"``
    (GPT-2 c_attn + c_proj, weights stored as (in, out)).
    """

    name: str
    attention_classes: tuple[str, ...]
    layout: str
    rotary: bool = True


FAMILIES: tuple[Family, ...] = (
    Family("llama", ("LlamaAttention",), "split"),
    Family("qwen2", ("Qwen2Attention",), "split"),
    Family("qwen3", ("Qwen3Attention",), "split"),
    Family("mistral", ("MistralAttention",), "split"),
    Family("gemma2", ("Gemma2Attention",), "split"),
    Family("gemma3", ("Gemma3Attention",), "split"),
    Family("phi3", ("Phi3Attention",), "fused"),
    Family("gpt2", ("GPT2Attention",), "conv1d", rotary=False),
)
_BY_CLASS = {cls: fam for fam in FAMILIES for cls in fam.attention_classes}
SUPPORTED = ", ".join(f.name for f in FAMILIES)


def family_class(module: nn.Module) -> type | None:
    """The transformers attention class of ``module``, looked up along its MRO: FSDP2's ``fully_shard`` swaps a
    module's class in place for a dynamic subclass (``FSDPLlamaAttention``), whose name and module are torch's."""
    return next((c for c in type(module).__mro__ if c.__name__ in _BY_CLASS), None)


def family_of(module: nn.Module) -> Family | None:
    cls = family_class(module)
    return None if cls is None else _BY_CLASS[cls.__name__]


def modelling_module(module: nn.Module) -> Any:
    """The transformers modelling module that defines ``module``'s family (its rotary and eager functions)."""
    cls = family_class(module) or type(module)
    return sys.modules[cls.__module__]


def attention_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """All supported self-attention modules of ``model`` in layer order; an error names the supported families."""
    found = [(n, m) for n, m in model.named_modules() if family_of(m) is not None]
    found = [(n, m) for n, m in found if not getattr(m, "is_cross_attention", False)]
    if not found:
        kinds = sorted({type(m).__name__ for _, m in model.named_modules() if type(m).__name__.endswith("Attention")})
        raise UnsupportedModelError(
            f"{type(model).__name__} is not supported (attention modules: {', '.join(kinds) or 'none found'}); "
            f"supported families: {SUPPORTED}"
        )
    return found


@dataclass
class Geometry:
    """Shapes of one attention layer."""

    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int

    @property
    def groups(self) -> int:
        return self.num_heads // self.num_kv_heads


def geometry(module: AttnModule) -> Geometry:
    cfg = module.config
    h = cfg.num_attention_heads
    return Geometry(
        hidden_size=cfg.hidden_size,
        num_heads=h,
        num_kv_heads=getattr(cfg, "num_key_value_heads", None) or h,
        head_dim=module.head_dim,
    )


# -- projections in (out, in) layout ------------------------------------------------------------------------------


def _slices(module: AttnModule) -> dict[str, slice]:
    g = geometry(module)
    q, kv = g.num_heads * g.head_dim, g.num_kv_heads * g.head_dim
    return {"q": slice(0, q), "k": slice(q, q + kv), "v": slice(q + kv, q + 2 * kv)}


def projection(module: AttnModule, which: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(weight (out, in), bias or None)`` of ``W_Q``/``W_K``/``W_V`` (``which`` = q, k, v) or ``W_O`` (o).

    Returned tensors are views of the live parameters (GPT-2's are transposed views), so in-place writes fold
    into the model.
    """
    fam = family_of(module)
    assert fam is not None
    if fam.layout == "split":
        lin = getattr(module, f"{which}_proj")
        return lin.weight, lin.bias
    if fam.layout == "fused":
        if which == "o":
            return module.o_proj.weight, module.o_proj.bias
        sl = _slices(module)[which]
        b = module.qkv_proj.bias
        return module.qkv_proj.weight[sl], (b[sl] if b is not None else None)
    # GPT-2 Conv1D: y = x @ W + b with W (in, out)
    if which == "o":
        return module.c_proj.weight.t(), module.c_proj.bias
    sl = _slices(module)[which]
    return module.c_attn.weight[:, sl].t(), module.c_attn.bias[sl]


def _projection_module(module: AttnModule, which: str) -> tuple[nn.Module, slice | None]:
    """The module that computes ``which`` and the slice of its output that is ``which`` (fused layouts)."""
    fam = family_of(module)
    assert fam is not None
    if fam.layout == "split":
        return getattr(module, f"{which}_proj"), None
    if which == "o":
        return (module.o_proj if fam.layout == "fused" else module.c_proj), None
    return (module.qkv_proj if fam.layout == "fused" else module.c_attn), _slices(module)[which]


def _unadapted(lin: nn.Module) -> nn.Module:
    while is_adapted(lin):
        lin = lin.base_layer  # type: ignore[assignment]
    return lin


def _base_bias(lin: nn.Module, sl: slice | None) -> torch.Tensor | None:
    b: torch.Tensor | None = getattr(_unadapted(lin), "bias", None)
    return None if b is None else (b if sl is None else b[sl])


def effective_projection(module: AttnModule, which: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Detached copies of the ``(weight (out, in), bias)`` the layer applies *now*: a peft adapter (LoRA) on the
    projection is included, so a copy taken before ``merge_and_unload`` equals the merged weight.

    Without an adapter this is :func:`projection`; with one, the wrapped module is evaluated on the identity (in
    eval mode, no dropout), which covers every peft tuner type without knowing its formula.
    """
    lin, sl = _projection_module(module, which)
    if not is_adapted(lin):
        w, b = projection(module, which)
        return w.detach().clone(), None if b is None else b.detach().clone()
    base = _unadapted(lin)
    bw: torch.Tensor = base.weight  # type: ignore[assignment]
    fan_in = bw.shape[0] if type(base).__name__ == "Conv1D" else bw.shape[1]  # Conv1D stores (in, out)
    b_full = getattr(base, "bias", None)
    was = lin.training
    lin.eval()
    try:
        with torch.no_grad():
            y = lin(torch.eye(fan_in, dtype=bw.dtype, device=bw.device))  # row i = W_eff e_i + b: (in, out)
    finally:
        lin.train(was)
    if b_full is not None:
        y = y - b_full
    w = y.t().contiguous()
    b = None if b_full is None else b_full.detach().clone()
    if sl is not None:
        w, b = w[sl].contiguous(), (None if b is None else b[sl].contiguous())
    return w, b


def _apply_projection(module: AttnModule, x: torch.Tensor, which: str, bias: bool) -> torch.Tensor:
    """``x`` through the layer's own projection ``which`` -> (B, N, heads * d)."""
    lin, sl = _projection_module(module, which)
    if is_adapted(lin):
        y: torch.Tensor = lin(x)
        if sl is not None:
            y = y[..., sl]
        b = _base_bias(lin, sl)
        if not bias and b is not None:
            y = y - b
        return y
    w, b = projection(module, which)
    return F.linear(x, w, b if bias else None)


def project(
    module: AttnModule, x: torch.Tensor, which: str, *, bias: bool = True,
    weights: tuple[torch.Tensor, torch.Tensor | None] | None = None,
) -> torch.Tensor:
    """Per-head projection of layer input ``x`` (B, N, d_model) -> (B, heads, N, d), before RoPE.

    Applies the family's per-head ``q_norm`` / ``k_norm`` (Qwen3, Gemma 3) exactly where the stock forward does,
    so ``rope(project(module, x, "q"))`` reproduces the stock query for the same ``x``.

    A projection wrapped by a peft adapter (LoRA) is *called*, so ``x`` goes through the effective projection
    (base + LoRA, gradients reaching the LoRA) exactly as the stock query/key/value does, and a later
    ``merge_and_unload`` leaves the output unchanged.

    ``weights``: ``(weight (out, in), bias or None)`` to use instead of the layer's own, e.g. a method's trained
    copy of ``W_Q``; the family's norm still applies.
    """
    if weights is not None:
        w, b = weights
        y = F.linear(x, w.to(x.dtype), None if b is None or not bias else b.to(x.dtype))
    else:
        y = _apply_projection(module, x, which, bias)
    y = y.reshape(*x.shape[:-1], -1, module.head_dim)
    norm = getattr(module, f"{which}_norm", None) if which in ("q", "k") else None
    if norm is not None:
        y = norm(y)
    return y.transpose(1, 2)


def _rotary_fn(module: AttnModule) -> Callable[..., tuple[torch.Tensor, torch.Tensor]] | None:
    fam = family_of(module)
    if fam is None or not fam.rotary:
        return None
    return modelling_module(module).apply_rotary_pos_emb  # type: ignore[no-any-return]


def rope(
    module: AttnModule, x: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor] | None
) -> torch.Tensor:
    """Rotate ``x`` (B, H, N, d) with the family's own rotary embedding; identity for families without RoPE."""
    fn = _rotary_fn(module)
    if fn is None or position_embeddings is None:
        return x
    cos, sin = position_embeddings
    return fn(x, x[:, :1], cos, sin)[0]


def unrope(
    module: AttnModule, x: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor] | None
) -> torch.Tensor:
    """Inverse of :func:`rope`: RoPE is a per-position rotation of pairs, scaled by ``cos^2 + sin^2`` when the
    rope type applies an attention factor, so its inverse is the same map with ``(cos, -sin) / (cos^2 + sin^2)``."""
    fn = _rotary_fn(module)
    if fn is None or position_embeddings is None:
        return x
    cos, sin = position_embeddings
    norm = cos.float().square() + sin.float().square()
    icos, isin = (cos.float() / norm).to(cos.dtype), (-sin.float() / norm).to(sin.dtype)
    return fn(x, x[:, :1], icos, isin)[0]


def is_causal(module: AttnModule) -> bool:
    return bool(getattr(module, "is_causal", True))
