"""The shared attention core (docs/methods.md, section Shared rules).

Fast path: fused ``scaled_dot_product_attention`` calls, GQA without repeating K/V (``enable_gqa``), combination of
the per-map outputs in float32 (``(a A1 + b A2) V = a O1 + b O2``); no N x N matrix is ever built here.

Reference path: :func:`probs` builds explicit softmax maps. It is used only when asked for (tests, attention plots,
``output_attentions``) or when the model needs something SDPA cannot do (Gemma 2's logit soft-capping).

All tensors follow transformers' attention-interface layout: query ``(B, H, Nq, D)``, key/value ``(B, Hkv, Nk, D)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

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


def valid_rows(mask: torch.Tensor | None) -> torch.Tensor | None:
    """(B, 1, Nq, 1) bool: rows that attend to at least one key (left-padding rows do not); ``None``: all do.
    ``mask`` is a resolved one (:func:`resolve_mask`)."""
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
    rows = valid_rows(m)
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


#: a combination of two maps that is linear in each: ``mix(A1, A2) V == mix(A1 V, A2 V)``
Mix = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def linear_mix(c1: Coef, c2: Coef) -> Mix:
    """``c1 X1 + c2 X2`` per query head, for maps ``(B, H, Nq, Nk)`` and outputs ``(B, H, Nq, D)`` alike."""

    def mix(x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        return per_head(c1, x1) * x1 + per_head(c2, x2) * x2

    return mix


def explicit(eager: bool, softcap: float | None) -> bool:
    """Whether attention takes the reference path (explicit maps): when asked for, or for Gemma 2's soft-capping,
    which SDPA cannot do."""
    return eager or softcap is not None


def _maps_or_outputs(
    q1: torch.Tensor, k1: torch.Tensor, q2: torch.Tensor, k2: torch.Tensor, v: torch.Tensor, *,
    mask: torch.Tensor | None, scaling: float | None, scaling2: float | None, dropout: float, causal: bool,
    softcap: float | None, eager: bool,
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """The one fast/reference switch of two-map attention: ``(A1, A2, True)``, explicit float32 maps, on the
    reference path; ``(O1, O2, False)`` from fused calls otherwise (one call when the query sets share keys and
    scale). ``scaling2`` is ``A2``'s own scale (default: ``scaling``)."""
    s2 = scaling if scaling2 is None else scaling2
    if explicit(eager, softcap):
        p1 = probs(q1, k1, mask=mask, scaling=scaling, causal=causal, softcap=softcap)
        p2 = probs(q2, k2, mask=mask, scaling=s2, causal=causal, softcap=softcap)
        return p1, p2, True
    if k1.shape[1] != v.shape[1]:
        # keys with a head per query head (OpAmp's "repeated" layout): SDPA's GQA wants K and V alike
        v = v.repeat_interleave(k1.shape[1] // v.shape[1], dim=1)
    if k1 is k2 and scaling == s2:
        o1, o2 = sdpa_shared_kv([q1, q2], k1, v, mask=mask, scaling=scaling, dropout=dropout, causal=causal)
    else:
        o1 = sdpa(q1, k1, v, mask=mask, scaling=scaling, dropout=dropout, causal=causal)
        o2 = sdpa(q2, k2, v, mask=mask, scaling=s2, dropout=dropout, causal=causal)
    return o1, o2, False


def two_map_attention(
    q1: torch.Tensor,
    k1: torch.Tensor,
    q2: torch.Tensor,
    k2: torch.Tensor,
    v: torch.Tensor,
    *,
    mix: Mix,
    mask: torch.Tensor | None,
    scaling: float | None,
    dropout: float = 0.0,
    causal: bool = True,
    softcap: float | None = None,
    eager: bool = False,
    dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``mix(A1, A2) V`` with ``A_j = softmax(s Q_j K_j^T)`` -> ``(out (B, H, Nq, D), map or None)``.

    ``mix`` is linear, so the fast path applies it to the fused outputs (in float32, cast once to ``dtype``,
    default ``v``'s) and never builds a map; the reference path applies it to the explicit maps and returns the
    combined map (plots, ``output_attentions``). A method whose combination must be exact at its identity writes
    ``mix`` so (OpAmp: ``X2 + g (X1 - X2)``).
    """
    x1, x2, maps = _maps_or_outputs(
        q1, k1, q2, k2, v, mask=mask, scaling=scaling, scaling2=None, dropout=dropout, causal=causal,
        softcap=softcap, eager=eager,
    )
    dtype = v.dtype if dtype is None else dtype
    if maps:
        pc = mix(x1, x2)
        return apply_probs(pc, v, dropout).to(dtype), pc
    return mix(x1.float(), x2.float()).to(dtype), None


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
    return two_map_attention(
        q1, k1, q2, k2, v, mix=linear_mix(c1, c2), mask=mask, scaling=scaling, dropout=dropout, causal=causal,
        softcap=softcap, eager=eager,
    )


class TwoMapParts(NamedTuple):
    """Both outputs of two maps, kept apart for a method that does more than mix them (a norm, an integral term).

    ``o1``, ``o2``: ``(B, H, Nq, D)``, float32 on the reference path; ``p1``, ``p2``: the explicit float32 maps on
    the reference path, ``None`` on the fast path.
    """

    o1: torch.Tensor
    o2: torch.Tensor
    p1: torch.Tensor | None
    p2: torch.Tensor | None


def two_map_parts(
    q1: torch.Tensor,
    k1: torch.Tensor,
    q2: torch.Tensor,
    k2: torch.Tensor,
    v: torch.Tensor,
    *,
    mask: torch.Tensor | None,
    scaling: float | None,
    scaling2: float | None = None,
    dropout: float = 0.0,
    causal: bool = True,
    softcap: float | None = None,
    eager: bool = False,
) -> TwoMapParts:
    """``O1 = A1 V`` and ``O2 = A2 V`` apart (:class:`TwoMapParts`); ``scaling2`` is ``A2``'s own scale (low-rank
    DINT's temperature), default ``scaling``."""
    x1, x2, maps = _maps_or_outputs(
        q1, k1, q2, k2, v, mask=mask, scaling=scaling, scaling2=scaling2, dropout=dropout, causal=causal,
        softcap=softcap, eager=eager,
    )
    if maps:
        return TwoMapParts(apply_probs(x1, v, dropout), apply_probs(x2, v, dropout), x1, x2)
    return TwoMapParts(x1, x2, None, None)


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
    if explicit(eager, softcap):
        p = probs(q, k, mask=mask, scaling=scaling, causal=causal, softcap=softcap)
        return apply_probs(p, v, dropout).to(v.dtype), p
    return sdpa(q, k, v, mask=mask, scaling=scaling, dropout=dropout, causal=causal), None
