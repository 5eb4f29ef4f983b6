"""The shared attention core (docs/methods.md, section Shared rules).

Fast path: fused ``scaled_dot_product_attention`` calls, GQA without repeating K/V (``enable_gqa``), combination of
the per-map outputs in float32 (``(a A1 + b A2) V = a O1 + b O2``); no N x N matrix is ever built here.

Reference path: :func:`probs` builds explicit softmax maps. It is used only when asked for (tests, attention plots,
``output_attentions``) or when the model needs something SDPA cannot do (Gemma 2's logit soft-capping).

All tensors follow transformers' attention-interface layout: query ``(B, H, Nq, D)``, key/value ``(B, Hkv, Nk, D)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

Coef = float | torch.Tensor  # a scalar, or one value per query head (H,)


def bottom_right_causal(nq: int, nk: int, device: torch.device) -> torch.Tensor:
    # With a KV cache the queries are the last nq positions: query i sees keys j <= i + (nk - nq).
    i = torch.arange(nq, device=device)[:, None]
    j = torch.arange(nk, device=device)[None, :]
    return (j <= i + (nk - nq)).view(1, 1, nq, nk)


def top_left_causal(nq: int, nk: int, device: torch.device) -> torch.Tensor:
    """Query i sees keys j <= i: what SDPA's ``is_causal`` does, and what transformers means by ``mask=None``."""
    i = torch.arange(nq, device=device)[:, None]
    j = torch.arange(nk, device=device)[None, :]
    return (j <= i).view(1, 1, nq, nk)


def resolve_mask(
    mask: torch.Tensor | None, nq: int, nk: int, causal: bool, device: torch.device
) -> tuple[torch.Tensor | None, bool]:
    """Return ``(mask, is_causal)`` for SDPA, matching transformers' stock sdpa rules (docs/methods.md, section
    Masking).

    transformers passes ``mask=None`` when there is no padding and ``nq == nk`` or ``nq == 1`` (nothing to mask),
    and also at the prefill of a *static* cache, where ``nk`` is the cache's full length and the keys past the
    prompt are empty slots. Stock sdpa then uses SDPA's ``is_causal`` (top-left: query i sees keys j <= i), which
    is right in every one of these cases, so do the same; a bottom-right alignment would let the last queries see
    the empty slots (docs/decisions.md, section attention.py).
    """
    if mask is not None:
        if mask.dtype == torch.bool and mask.shape[-1] != nk:
            mask = mask[..., :nk]
        return mask, False
    if not causal or nq == 1:
        return None, False
    return None, True


def _valid_rows(mask: torch.Tensor | None) -> torch.Tensor | None:
    """(B, 1, Nq, 1) bool: rows that attend to at least one key (left-padding rows do not)."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return mask.any(dim=-1, keepdim=True)
    return (mask > torch.finfo(mask.dtype).min / 2).any(dim=-1, keepdim=True)


def sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    mask: torch.Tensor | None,
    scaling: float | None,
    dropout: float = 0.0,
    causal: bool = True,
) -> torch.Tensor:
    """One fused attention call -> ``(B, H, Nq, D)``; fully masked rows are zeros (never NaN)."""
    m, is_causal = resolve_mask(mask, q.shape[-2], k.shape[-2], causal, q.device)
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=m, dropout_p=dropout, is_causal=is_causal, scale=scaling,
        enable_gqa=q.shape[1] != k.shape[1],
    )
    rows = _valid_rows(m)
    if rows is not None:
        out = out.masked_fill(~rows, 0.0)
    return out


#: devices on which :func:`sdpa_shared_kv` issues ONE call with ``m*h`` query heads by default; on CPU separate calls
#: measured faster and lighter (docs/decisions.md, section attention.py).
ONE_CALL_DEVICES: frozenset[str] = frozenset({"cuda"})


def sdpa_shared_kv(
    queries: Sequence[torch.Tensor],
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    mask: torch.Tensor | None,
    scaling: float | None,
    dropout: float = 0.0,
    causal: bool = True,
    one_call: bool | None = None,
) -> list[torch.Tensor]:
    """Several query sets against the same K/V: ``[softmax(s Q_j K^T) V for Q_j in queries]``, fused.

    ``one_call=True`` issues ONE fused call with ``m*h`` query heads (``2h`` for two query sets): the query sets
    are interleaved per key/value group so that GQA still maps every query head to its own kv head without
    repeating K/V: (B, Hkv, m, g, N, D) -> (B, m*H, N, D). ``one_call=False`` issues one fused call per query set.
    ``None`` picks by device (:data:`ONE_CALL_DEVICES`). Both compute the same values.
    """
    if one_call is None:
        one_call = queries[0].device.type in ONE_CALL_DEVICES
    if not one_call:
        return [sdpa(q, k, v, mask=mask, scaling=scaling, dropout=dropout, causal=causal) for q in queries]
    m = len(queries)
    b, h, n, d = queries[0].shape
    hkv = k.shape[1]
    stacked = torch.stack([x.reshape(b, hkv, h // hkv, n, d) for x in queries], dim=2).reshape(b, m * h, n, d)
    out = sdpa(stacked, k, v, mask=mask, scaling=scaling, dropout=dropout, causal=causal)
    out = out.reshape(b, hkv, m, h // hkv, n, v.shape[-1])
    return [out[:, :, i].reshape(b, h, n, v.shape[-1]) for i in range(m)]


def probs(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    mask: torch.Tensor | None,
    scaling: float | None,
    causal: bool = True,
    softcap: float | None = None,
) -> torch.Tensor:
    """Explicit softmax map ``(B, H, Nq, Nk)`` in float32 (reference path only)."""
    h, hkv = q.shape[1], k.shape[1]
    if h != hkv:
        k = k.repeat_interleave(h // hkv, dim=1)
    scale = scaling if scaling is not None else q.shape[-1] ** -0.5
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    m, is_causal = resolve_mask(mask, q.shape[-2], k.shape[-2], causal, q.device)
    if is_causal:
        m = top_left_causal(q.shape[-2], k.shape[-2], q.device)
    if m is not None:
        scores = scores.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else scores + m.float()
    p = torch.softmax(scores, dim=-1)
    return torch.nan_to_num(p, nan=0.0)  # rows with no visible key: zeros (docs/methods.md, section Masking)


def apply_probs(p: torch.Tensor, v: torch.Tensor, dropout: float = 0.0) -> torch.Tensor:
    """``P V`` with GQA values, in float32 -> ``(B, H, Nq, D)`` float32."""
    h, hkv = p.shape[1], v.shape[1]
    if h != hkv:
        v = v.repeat_interleave(h // hkv, dim=1)
    if dropout > 0:
        p = F.dropout(p, dropout, training=True)
    return torch.matmul(p, v.float())


def per_head(c: Coef, like: torch.Tensor) -> torch.Tensor | float:
    """Broadcast a coefficient over ``(B, H, N, D)``: scalars stay scalars, ``(H,)`` becomes ``(1, H, 1, 1)``."""
    if isinstance(c, torch.Tensor):
        return c.float().reshape(1, -1, 1, 1).to(like.device)
    return float(c)


def combine(terms: Sequence[tuple[Coef, torch.Tensor]], dtype: torch.dtype) -> torch.Tensor:
    """``sum_j c_j O_j`` in float32, cast back once (docs/methods.md, section Float32 combination)."""
    acc: torch.Tensor | None = None
    for c, o in terms:
        t = per_head(c, o) * o.float()
        acc = t if acc is None else acc + t
    assert acc is not None
    return acc.to(dtype)


def two_maps(
    q1: torch.Tensor,
    k1: torch.Tensor,
    q2: torch.Tensor,
    k2: torch.Tensor,
    v: torch.Tensor,
    c1: Coef,
    c2: Coef,
    *,
    mask: torch.Tensor | None,
    scaling: float | None,
    dropout: float = 0.0,
    causal: bool = True,
    softcap: float | None = None,
    eager: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(c1 A1 + c2 A2) V`` with ``A_j = softmax(s Q_j K_j^T)`` -> ``(out (B, H, Nq, D), map or None)``.

    Fast path: one fused call when ``k1 is k2`` (the query sets share keys), two otherwise. Reference path
    (``eager`` or soft-capping): the explicit combined map, which is also returned for plots/``output_attentions``.
    """
    if eager or softcap is not None:
        kw = dict(mask=mask, scaling=scaling, causal=causal, softcap=softcap)
        p1, p2 = probs(q1, k1, **kw), probs(q2, k2, **kw)  # type: ignore[arg-type]
        pc = per_head(c1, p1) * p1 + per_head(c2, p2) * p2
        return apply_probs(pc, v, dropout).to(v.dtype), pc
    kw2 = dict(mask=mask, scaling=scaling, dropout=dropout, causal=causal)
    if k1 is k2:
        o1, o2 = sdpa_shared_kv([q1, q2], k1, v, **kw2)  # type: ignore[arg-type]
    else:
        o1 = sdpa(q1, k1, v, **kw2)  # type: ignore[arg-type]
        o2 = sdpa(q2, k2, v, **kw2)  # type: ignore[arg-type]
    return combine([(c1, o1), (c2, o2)], v.dtype), None


def one_map(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    mask: torch.Tensor | None,
    scaling: float | None,
    dropout: float = 0.0,
    causal: bool = True,
    softcap: float | None = None,
    eager: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Plain attention ``A V`` -> ``(out (B, H, Nq, D) in float32 when eager, map or None)``."""
    if eager or softcap is not None:
        p = probs(q, k, mask=mask, scaling=scaling, causal=causal, softcap=softcap)
        return apply_probs(p, v, dropout).to(v.dtype), p
    return sdpa(q, k, v, mask=mask, scaling=scaling, dropout=dropout, causal=causal), None
