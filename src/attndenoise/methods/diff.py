"""DIFF attention retrofit: the Differential Transformer's two maps on a pretrained model.

Paper: Ye et al., "Differential Transformer", arXiv 2410.05258. Math and decisions: docs/methods.md, section DIFF
retrofit.

``O' = (A1 - lambda A2) V`` with ``A_j = softmax(s Q_j K_j^T)``.

Retrofit (default): ``Q1 = Q``, ``K1 = K`` are the pretrained ones; ``Q2``, ``K2`` come from new projections
``W_Q2``, ``W_K2`` (with biases where the family has them) initialised as copies of ``W_Q``, ``W_K``. They go through
the family's own ``q_norm``/``k_norm`` and rotary embedding exactly like the stock query/key, so ``A2 = A1`` at
init, and with ``lambda(0) = 0`` the model is unchanged. ``K2`` is computed once per token and cached next to ``K``
(concatenated on the head-dim axis). The copies are taken in :meth:`DIFF.calibrate`, the only hook that sees the
stock model before the per-layer modules are built.

Lambda: the common schedule (``lambda_learn`` starts at 0), or with ``lambda_reparam=True`` DIFF's
``exp(lq1 . lk1) - exp(lq2 . lk2) + lambda_init`` in place of ``lambda_learn`` (:class:`ReparamLambda`).

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
import torch.nn.functional as F
from torch import nn

from .. import attention as core
from .. import registry
from ..config import ConfigError, MethodConfig, positive
from ..families import attention_layers, effective_projection, rope
from ..schedule import LambdaSchedule
from .base import Call, LayerContext, LayerInfo, MethodModule

# -- shared with DINT (methods/dint.py) ----------------------------------------------------------------------------

#: private attribute of a calibrated config: layer index -> copies of (W_Q, b_Q), (W_K, b_K), consumed by __init__
_SOURCES = "_second_projection_sources"


def _check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"{name}={value!r}: must be true or false")


def stash_second_projections(model: nn.Module, config: MethodConfig) -> MethodConfig:
    """A copy of ``config`` carrying clones of ``W_Q``/``W_K`` (and biases) of the chosen layers of the stock model.

    The per-layer module is built from ``(config, LayerInfo)`` only, so this is how it can start as a copy of the
    pretrained projections (docs/methods.md, section DIFF retrofit). Each module pops its entry, so no extra memory
    is held after :func:`apply`; the attribute is not a dataclass field and never reaches ``attndenoise_config.json``.
    Under a peft adapter (LoRA) the copy is of the *effective* projection (base + LoRA), so ``A2 = A1`` at init in
    either order of wrapping; the copy is the method's own parameter afterwards, so a later LoRA merge does not
    change it.
    """
    layers = attention_layers(model)
    new = dataclasses.replace(config)
    sources: dict[int, dict[str, tuple[torch.Tensor, torch.Tensor | None]]] = {}
    with torch.no_grad():
        for i in config.select_layers(len(layers)):
            attn = layers[i][1]
            entry = {}
            for which in ("q", "k"):
                entry[which] = effective_projection(attn, which)
            sources[i] = entry
    object.__setattr__(new, _SOURCES, sources)
    return new


def project_with(
    attn: nn.Module, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, which: str
) -> torch.Tensor:
    """:func:`attndenoise.families.project` with our own weight: ``x`` (B, N, d_model) -> (B, heads, N, d) before
    RoPE, through the family's per-head ``q_norm``/``k_norm`` where the stock forward applies them."""
    y = F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))
    head_dim: int = attn.head_dim  # type: ignore[assignment]
    y = y.view(*x.shape[:-1], -1, head_dim)
    norm = getattr(attn, f"{which}_norm", None)
    if norm is not None:
        y = norm(y)
    return y.transpose(1, 2)


class SecondProjections(nn.Module):
    """``W_Q2``, ``W_K2`` (+ biases), copies of the pretrained ``W_Q``, ``W_K`` at init."""

    q_weight: nn.Parameter
    q_bias: nn.Parameter | None
    k_weight: nn.Parameter
    k_bias: nn.Parameter | None

    def __init__(self, config: MethodConfig, info: LayerInfo) -> None:
        super().__init__()
        src = getattr(config, _SOURCES, {}).pop(info.index, None)
        if src is None:
            raise RuntimeError(
                f"method '{config.name}' copies W_Q/W_K of the stock model: build it with attndenoise.apply "
                "(or attndenoise.load), which calibrates the config first"
            )
        for which in ("q", "k"):
            w, b = src[which]
            self.register_parameter(f"{which}_weight", nn.Parameter(w))
            self.register_parameter(f"{which}_bias", None if b is None else nn.Parameter(b))

    def forward(
        self, attn: nn.Module, x: torch.Tensor, pos: tuple[torch.Tensor, torch.Tensor] | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotated ``(Q2 (B, h, N, d), K2 (B, h_kv, N, d))`` of the layer input ``x``."""
        q2 = project_with(attn, x, self.q_weight, self.q_bias, "q")
        k2 = project_with(attn, x, self.k_weight, self.k_bias, "k")
        return rope(attn, q2, pos), rope(attn, k2, pos)


class ReparamLambda(LambdaSchedule):
    """DIFF's ``r = exp(lq1 . lk1) - exp(lq2 . lk2) + lambda_init`` under the common warm-up.

    The four vectors are drawn from ``N(0, std^2)`` (length ``head_dim``; one set per layer, or per head/pair). ``r``
    enters the schedule *in place of* ``lambda_learn``: ``"paper"``: ``lambda(t) = (1 - a) (t/T) lambda_init + a r``,
    ``"linear"``: ``lambda(t) = a r``, ``a = min(1, t/T)``. So ``lambda(0) = 0`` (identity at init when
    ``anneal_steps > 0``) and ``lambda(t >= T) = r`` ("once warm-up ends"); with ``anneal_steps=0`` ``lambda = r``
    from the start, as in a from-scratch DIFF model (not the identity then). See docs/methods.md, section DIFF
    retrofit.

    A :class:`LambdaSchedule` subclass so that :func:`attndenoise.step`, the Trainer callback and saving treat its
    ``step`` like every other schedule's; it has no ``lambda_learn``.
    """

    lambda_q1: nn.Parameter
    lambda_k1: nn.Parameter
    lambda_q2: nn.Parameter
    lambda_k2: nn.Parameter

    def __init__(
        self, num: int, dim: int, lambda_init: float, anneal_steps: int, kind: str, std: float
    ) -> None:
        super().__init__(num, lambda_init, anneal_steps, kind)
        del self.lambda_learn
        for name in ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2"):
            self.register_parameter(name, nn.Parameter(torch.randn(num, dim) * std))

    def reparam(self) -> torch.Tensor:
        """``r``, shape ``(num,)``, float32."""
        e1 = torch.exp((self.lambda_q1.float() * self.lambda_k1.float()).sum(-1))
        e2 = torch.exp((self.lambda_q2.float() * self.lambda_k2.float()).sum(-1))
        return e1 - e2 + self.lambda_init

    def forward(self) -> torch.Tensor:
        r = self.reparam()
        if self.anneal_steps == 0:
            return r
        ramp = self.step.float() / self.anneal_steps
        alpha = ramp.clamp(max=1.0)
        if self.kind == "linear":
            return alpha * r
        return (1 - alpha) * ramp * self.lambda_init + alpha * r


def make_lambda(module: MethodModule, num: int) -> LambdaSchedule:
    """The lambda of a DIFF/DINT layer: the common schedule, or the DIFF re-parameterisation when asked for."""
    c = module.config
    if getattr(c, "lambda_reparam", False):
        n = num if c.lambda_granularity == "head" else 1
        return ReparamLambda(
            n, module.info.geometry.head_dim, c.lambda_init_for(module.info.index), c.anneal_steps,
            c.lambda_schedule, c.lambda_std,  # type: ignore[attr-defined]
        )
    return module.make_lambda(num)


def two_outputs(
    call: Call, q1: torch.Tensor, k1: torch.Tensor, q2: torch.Tensor, k2: torch.Tensor, v: torch.Tensor,
    scaling2: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """``O1 = A1 V``, ``O2 = A2 V`` kept apart (for a norm or an integral term before the combine).

    Fast path (docs/methods.md, section Fused fast path): fused SDPA calls, one when the query sets share keys and
    temperature; maps are ``None``.
    Reference path (``call.eager`` or soft-capping): explicit float32 maps, returned with the float32 outputs.
    ``scaling2`` is ``A2``'s own scale (low-rank DINT's temperature); default the layer's.
    """
    s1 = call.scaling
    s2 = s1 if scaling2 is None else scaling2
    if call.eager or call.softcap is not None:
        kw: dict[str, Any] = dict(mask=call.mask, causal=call.causal, softcap=call.softcap)
        p1 = core.probs(q1, k1, scaling=s1, **kw)
        p2 = core.probs(q2, k2, scaling=s2, **kw)
        return core.apply_probs(p1, v, call.dropout), core.apply_probs(p2, v, call.dropout), p1, p2
    kw2: dict[str, Any] = dict(mask=call.mask, dropout=call.dropout, causal=call.causal)
    if k1 is k2 and s1 == s2:
        o1, o2 = core.sdpa_shared_kv([q1, q2], k1, v, scaling=s1, **kw2)
    else:
        o1 = core.sdpa(q1, k1, v, scaling=s1, **kw2)
        o2 = core.sdpa(q2, k2, v, scaling=s2, **kw2)
    return o1, o2, None, None


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


# -- DIFF ----------------------------------------------------------------------------------------------------------


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
            _check_bool(name, getattr(self, name))
        if self.norm_eps is not None:
            positive("norm_eps", self.norm_eps)
        positive("lambda_std", self.lambda_std, allow_zero=True)


class DIFF(MethodModule):
    """``(A1 - lambda A2) V`` with a second, cached key set (retrofit) or DiffLlama's head pairs."""

    caches_kv = True

    def __init__(self, config: DIFFConfig, info: LayerInfo) -> None:
        super().__init__(config, info)
        g = info.geometry
        self.lambda_init = config.lambda_init_for(info.index)
        if config.pairing:
            if g.num_heads % 2 or g.num_kv_heads % 2:
                raise ConfigError(
                    f"pairing=True needs an even number of query heads and of key/value heads (DiffLlama's layout); "
                    f"this model has {g.num_heads} query and {g.num_kv_heads} key/value heads"
                )
            self.proj2: SecondProjections | None = None
            self.lam = make_lambda(self, g.num_heads // 2)
        else:
            self.proj2 = SecondProjections(config, info)
            self.lam = make_lambda(self, g.num_heads)

    @classmethod
    def calibrate(cls, model: nn.Module, config: MethodConfig, **kwargs: Any) -> MethodConfig:
        """Resolve ``norm_eps`` from the model and copy ``W_Q``/``W_K`` for the retrofit's second projections."""
        assert isinstance(config, DIFFConfig)
        super().calibrate(model, config, **kwargs)
        if config.norm_eps is None:
            config = dataclasses.replace(config, norm_eps=model_norm_eps(model))
        if config.pairing:
            return config
        return stash_second_projections(model, config)

    # -- per token ---------------------------------------------------------------------------------------------
    def prepare(self, attn: nn.Module, ctx: LayerContext) -> None:
        if self.proj2 is not None:
            ctx.extras["q2"], ctx.extras["k2"] = self.proj2(attn, ctx.hidden_states, ctx.position_embeddings)

    def store(self, attn, key, value, ctx: LayerContext):  # type: ignore[no-untyped-def]
        if self.proj2 is None:
            # pairing: each pair reads [V_a, V_{a + h_kv/2}]; store that layout (h_kv/2 heads, width 2d)
            m = value.shape[1] // 2
            return key, torch.cat([value[:, :m], value[:, m:]], dim=-1)
        if ctx.cached:  # K2 rides in the cache next to K; without a cache attend reads it from ctx
            return torch.cat([key, ctx.extras["k2"].to(key.dtype)], dim=-1), value
        return key, value

    # -- attention ---------------------------------------------------------------------------------------------
    def _finish(self, out: torch.Tensor) -> torch.Tensor:
        """Optional per-head RMSNorm and ``(1 - lambda_init)`` on a float32 output."""
        if not self.config.head_norm:  # type: ignore[attr-defined]
            return out
        return rms_norm(out, self.config.norm_eps or 1e-5) * (1.0 - self.lambda_init)  # type: ignore[attr-defined]

    def attend(self, attn, query, key, value, ctx: LayerContext, call: Call):  # type: ignore[no-untyped-def]
        if self.proj2 is None:
            return self._attend_pairs(query, key, value, call)
        if ctx.cached:
            k1, k2 = key.chunk(2, dim=-1)
        else:
            k1, k2 = key, ctx.extras["k2"].to(key.dtype)
        lam = self.lam()
        o1, o2, p1, p2 = two_outputs(call, query, k1, ctx.extras["q2"].to(query.dtype), k2, value)
        out = self._finish(core.combine([(1.0, o1), (-lam, o2)], torch.float32))
        pmap = None if p1 is None or p2 is None else p1 - core.per_head(lam, p1) * p2
        return out.to(value.dtype), pmap

    def _attend_pairs(self, query, key, vpair, call: Call):  # type: ignore[no-untyped-def]
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
        lam = self.lam()
        if call.eager or call.softcap is not None:
            p = core.probs(query, key, mask=call.mask, scaling=call.scaling, causal=call.causal, softcap=call.softcap)
            pmap = p[:, :hp] - core.per_head(lam, p[:, :hp]) * p[:, hp:]
            out = core.apply_probs(pmap, vpair, call.dropout)
        else:
            kw: dict[str, Any] = dict(mask=call.mask, scaling=call.scaling, dropout=call.dropout, causal=call.causal)
            o1 = core.sdpa(query[:, :hp], key[:, :m], vpair, **kw)
            o2 = core.sdpa(query[:, hp:], key[:, m:], vpair, **kw)
            out, pmap = core.combine([(1.0, o1), (-lam, o2)], torch.float32), None
        out = self._finish(out)  # (B, h/2, N, 2d): the norm spans both value halves, as in DiffLlama
        out = out.view(b, hp, n, 2, d).permute(0, 1, 3, 2, 4).reshape(b, h, n, d)  # pair i -> heads 2i, 2i+1
        return out.to(vpair.dtype), pmap


registry.register(DIFFConfig, DIFF)
