"""Independent references for the tests: stock transformers computations and explicit maps, written here.

Nothing in this file imports attndenoise: it captures what the *stock* model computes and builds explicit
attention maps with plain torch, so a method's fused output can be checked against its formula (docs/methods.md).
"""

from __future__ import annotations

import copy
import sys
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask

_RECORD: dict[int, dict[str, Any]] = {}


def _record_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):  # type: ignore[no-untyped-def]
    _RECORD[module.layer_idx] = dict(
        q=query, k=key, v=value, mask=attention_mask, scaling=scaling, softcap=kwargs.get("softcap"),
        sliding_window=kwargs.get("sliding_window"),
    )
    eager = sys.modules[type(module).__module__].eager_attention_forward
    return eager(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)


AttentionInterface.register("test_record", _record_attention)
AttentionMaskInterface.register("test_record", eager_mask)  # always explicit: eager needs it


def attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if type(m).__name__.endswith("Attention") and hasattr(m, "layer_idx")]


def out_proj(attn: torch.nn.Module) -> torch.nn.Module:
    return attn.c_proj if hasattr(attn, "c_proj") else attn.o_proj


@dataclass
class Captured:
    """What the stock model computes in one layer."""

    hidden: torch.Tensor  # layer input (B, N, d_model)
    q: torch.Tensor  # (B, H, N, D) after RoPE
    k: torch.Tensor  # (B, Hkv, N, D)
    v: torch.Tensor
    mask: torch.Tensor | None
    scaling: float
    softcap: float | None
    out: torch.Tensor  # attention output before the output projection (B, N, H*D)
    q_pre: torch.Tensor | None  # query before RoPE (after q_norm), (B, H, N, D)
    pos: tuple[torch.Tensor, torch.Tensor] | None


def capture(model: torch.nn.Module, x: torch.Tensor, layer: int, **fwd: Any) -> Captured:
    """Run the stock ``model`` (eager math) on ``x`` and capture layer ``layer``'s attention inputs/outputs."""
    attn = attention_modules(model)[layer]
    got: dict[str, Any] = {}

    def pre(mod, args, kwargs):  # type: ignore[no-untyped-def]
        got["hidden"] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        got["pos"] = kwargs.get("position_embeddings")

    def o_pre(mod, args):  # type: ignore[no-untyped-def]
        got["out"] = args[0]

    hooks = [attn.register_forward_pre_hook(pre, with_kwargs=True), out_proj(attn).register_forward_pre_hook(o_pre)]
    qsrc = getattr(attn, "q_norm", None) or getattr(attn, "q_proj", None) or getattr(attn, "qkv_proj", None)
    if qsrc is not None:
        def qhook(mod, args, output):  # type: ignore[no-untyped-def]
            got["qsrc"] = output
        hooks.append(qsrc.register_forward_hook(qhook))
    original = model.config._attn_implementation
    model.set_attn_implementation("test_record")
    try:
        with torch.no_grad():
            model(x, **fwd)
    finally:
        model.set_attn_implementation(original)
        for h in hooks:
            h.remove()
    rec = _RECORD[attn.layer_idx]
    q = rec["q"]
    b, h, n, d = q.shape
    q_pre = None
    if "qsrc" in got:
        src = got["qsrc"]
        if hasattr(attn, "qkv_proj") and src.shape[-1] != d:
            src = src[..., : h * d]
        if src.dim() == 3:
            q_pre = src.reshape(b, n, h, d).transpose(1, 2)
        else:  # q_norm output: Qwen3 normalises (B, N, H, D), Gemma 3 (B, H, N, D)
            q_pre = src if src.shape[1] == h and src.shape[2] == n else src.transpose(1, 2)
    elif not hasattr(attn, "q_proj"):  # GPT-2: no rotary embedding
        q_pre = q
    return Captured(
        hidden=got["hidden"], q=q, k=rec["k"], v=rec["v"], mask=rec["mask"], scaling=rec["scaling"],
        softcap=rec["softcap"], out=got["out"], q_pre=q_pre, pos=got.get("pos"),
    )


def patched_out(model: torch.nn.Module, x: torch.Tensor, layer: int, **fwd: Any) -> torch.Tensor:
    """Attention output before the output projection of layer ``layer`` of any (patched) model."""
    attn = attention_modules(model)[layer]
    got: dict[str, torch.Tensor] = {}
    h = out_proj(attn).register_forward_pre_hook(lambda m, a: got.setdefault("out", a[0]))
    try:
        with torch.no_grad():
            model(x, **fwd)
    finally:
        h.remove()
    return got["out"]


def explicit_map(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, scaling: float,
                 softcap: float | None = None) -> torch.Tensor:
    """softmax(s q k^T [softcap] + mask), causal when no mask is given; float64 for a tight reference."""
    h, hkv = q.shape[1], k.shape[1]
    k = k.repeat_interleave(h // hkv, dim=1).double()
    s = (q.double() @ k.transpose(-1, -2)) * scaling
    if softcap is not None:
        s = torch.tanh(s / softcap) * softcap
    n, m = s.shape[-2:]
    if mask is None:
        mask = torch.ones(n, m, dtype=torch.bool).tril(m - n)[None, None]
    s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask.double()
    return torch.softmax(s, -1).nan_to_num(0.0)


def apply_map(p: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    h, hkv = p.shape[1], v.shape[1]
    return p @ v.repeat_interleave(h // hkv, dim=1).double()


def heads_last(o: torch.Tensor) -> torch.Tensor:
    """(B, H, N, D) -> (B, N, H*D) as the output projection sees it."""
    b, h, n, d = o.shape
    return o.transpose(1, 2).reshape(b, n, h * d)


def rope(attn: torch.nn.Module, x: torch.Tensor, pos: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    """Transformers' own rotary function of the family (identity for GPT-2)."""
    if pos is None:
        return x
    fn = sys.modules[type(attn).__module__].apply_rotary_pos_emb
    return fn(x, x, pos[0], pos[1])[0]


def _fused_slices(model: torch.nn.Module, attn: torch.nn.Module) -> dict[str, slice]:
    """Where Q, K and V sit in a fused projection (Phi-3 ``qkv_proj``, GPT-2 ``c_attn``)."""
    cfg = model.config
    h = cfg.num_attention_heads
    d = attn.head_dim
    hkv = getattr(cfg, "num_key_value_heads", None) or h
    return {"q": slice(0, h * d), "k": slice(h * d, h * d + hkv * d), "v": slice(h * d + hkv * d, h * d + 2 * hkv * d)}


def _read_projection(attn: torch.nn.Module, sl: dict[str, slice], which: str) -> torch.Tensor:
    """A copy of projection ``which``'s weight as (out, in), whatever the family's layout."""
    if hasattr(attn, f"{which}_proj"):
        return getattr(attn, f"{which}_proj").weight.clone()
    if hasattr(attn, "qkv_proj"):
        return attn.qkv_proj.weight[sl[which]].clone()
    return attn.c_attn.weight[:, sl[which]].t().clone()  # GPT-2 Conv1D stores (in, out)


def _write_projection(attn: torch.nn.Module, sl: dict[str, slice], which: str, w: torch.Tensor,
                      b: torch.Tensor | None = None, *, bias: bool = False) -> None:
    """Write projection ``which``'s weight ``w`` (out, in) and, with ``bias``, its bias ``b`` into the family's
    layout (Phi-3's fused projection has no bias: asserted when a bias is to be written)."""
    if hasattr(attn, f"{which}_proj"):
        lin = getattr(attn, f"{which}_proj")
        lin.weight.copy_(w)
        if bias and lin.bias is not None:
            lin.bias.copy_(b)
    elif hasattr(attn, "qkv_proj"):
        attn.qkv_proj.weight[sl[which]] = w
        if bias:
            assert attn.qkv_proj.bias is None
    else:  # GPT-2 Conv1D (in, out)
        attn.c_attn.weight[:, sl[which]] = w.t()
        if bias:
            attn.c_attn.bias[sl[which]] = b


def set_projection(model: torch.nn.Module, layer: int, which: str, fn: Any) -> torch.nn.Module:
    """A deep copy of ``model`` whose layer ``layer`` projection ``which`` (q/k/v) weight W (out, in) is replaced
    by ``fn(W)`` -- the stock model then computes e.g. ``(X W_D) W_Q`` for us."""
    m = copy.deepcopy(model)
    attn = attention_modules(m)[layer]
    sl = _fused_slices(m, attn)
    with torch.no_grad():
        _write_projection(attn, sl, which, fn(_read_projection(attn, sl, which)))
    return m


def with_qk(model: torch.nn.Module, layer: int, wq: torch.Tensor, bq: torch.Tensor | None, wk: torch.Tensor,
            bk: torch.Tensor | None) -> torch.nn.Module:
    """A deep copy of the stock ``model`` whose layer ``layer`` uses the given W_Q/b_Q and W_K/b_K ((out, in))."""
    m = copy.deepcopy(model)
    attn = attention_modules(m)[layer]
    sl = _fused_slices(m, attn)
    with torch.no_grad():
        for which, w, b in (("q", wq, bq), ("k", wk, bk)):
            _write_projection(attn, sl, which, w, b, bias=True)
    return m
