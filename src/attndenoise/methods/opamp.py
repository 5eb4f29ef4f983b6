"""OpAmp adaptation: four bottleneck adapters on Q/K and an operational-amplifier combination of two maps.

Paper: Wu et al., "Efficient OpAmp Adaptation for Zoom Attention to Golden Contexts", arXiv 2502.12502; placement as
in the authors' public code, github.com/wuhy68/OpampAdapter. Math and decisions: docs/methods.md, section OpAmp.

Four adapters ``E(x) = x + c W2 phi(W1 dropout(x))`` (``phi`` = exact GELU, dropout ``adapter_dropout`` on the
adapter input in training only, the residual is the un-dropped ``x``; ``W1`` (``adapter_dim`` x size)
kaiming-uniform, ``W2`` zero, ``c = adapter_scaling``) act on the vector of *all heads concatenated*, after the
family's own q/k norms and rotary embedding, i.e. on exactly what the attention function receives:

``Q1 = E_q1(Q)``, ``Q2 = E_q2(Q)``, ``K1 = E_k1(K)``, ``K2 = E_k2(K)``, ``A_j = softmax(s Q_j K_j^T)``,
``M = A_d (A1 - A2) + (A_c / 2)(A1 + A2)`` with ``A_c = 1``, ``A_d = K`` (``cmrr``), so
``O' = (K + 1/2) O1 - (K - 1/2) O2``, computed in float32 as ``O2 + (K + 1/2)(O1 - O2)``: with ``W2 = 0`` both
maps are the stock map, ``O1 == O2`` bit for bit, and the output is the stock output exactly, with no
``10.5 O - 9.5 O`` cancellation round-off.

Key adapters (``key_adapters``):

* ``"kv_heads"`` (default; the authors' Llama code): ``E_k`` acts on the key/value heads concatenated, before any
  GQA repetition (size ``h_kv d``). Attention stays GQA-native.
* ``"repeated"`` (the authors' Qwen2 code): their Qwen2 attention repeats K to ``h`` heads *first* and adapts the
  repeated vector (size ``h d``), so every query head gets its own adapted key. Needed to run checkpoints trained
  that way (:func:`attndenoise.load_opamp_checkpoint`); it costs ``h / h_kv`` times the key memory and repeats V.
  Without GQA (``h == h_kv``) both layouts are the same function.

Caching: ``K1`` and ``K2`` are computed once per new token and stored in the KV cache in place of ``K``
(concatenated on the head-dim axis: ``(B, heads, N, 2d)``), so a decoding step runs the key adapters over one
token. The authors' code instead caches ``K`` and re-runs both key adapters over the whole cache at every step;
``cache_adapted_keys=False`` reproduces that, **for benchmarks only** (same outputs, slower decoding).

Layers: the common ``layers`` field. The authors' rule ``layer_idx % adapter_layer == 0`` is ``"every:N"``; they
trained with ``"every:2"`` for Llama-3.1-8B and ``"every:3"`` for Qwen2.5 (``adapter_layer`` in their
``train_na_sn.py``); their configuration classes default to every layer, which is the default here too.

The common ``anneal_steps`` / ``lambda_*`` fields of :class:`~attndenoise.config.MethodConfig` do not apply: OpAmp
has no lambda schedule (its identity at init comes from ``W2 = 0``), so they are ignored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .. import registry
from ..config import ConfigError, MethodConfig, boolean, choice, positive
from .base import AttentionCall, LayerContext, LayerInfo, MethodModule

KEY_ADAPTERS = ("kv_heads", "repeated")


@dataclass
class OpAmpConfig(MethodConfig):
    """OpAmp options (the module docstring has the math).

    Attributes:
        adapter_dim: bottleneck ``d2`` of each adapter (the authors trained with 64; the paper text says 512).
        adapter_scaling: ``c`` in ``E(x) = x + c W2 phi(W1 x)`` (the authors trained with 1.0).
        adapter_dropout: dropout probability on the adapter input while training (the authors: 0.1).
        cmrr: ``K = A_d / A_c`` with ``A_c = 1`` (the paper's ablation picks 10).
        key_adapters: ``"kv_heads"`` (adapt the key/value heads, before GQA repetition) or ``"repeated"`` (adapt
            the keys repeated to the query heads, as the authors' Qwen2 code does).
        cache_adapted_keys: **benchmark only.** ``True`` caches ``K1, K2``; ``False`` caches ``K`` and re-runs the
            key adapters over the whole cache at every decoding step, as the authors' code does. Both compute the
            same outputs; leave it ``True`` except to measure the difference.
    """

    name = "opamp"
    two_maps = True
    summary = "four bottleneck adapters on Q/K, (K + 1/2) O1 - (K - 1/2) O2 with CMRR K"
    uses_lambda_schedule: ClassVar[bool] = False
    adapter_dim: int = 64
    adapter_scaling: float = 1.0
    adapter_dropout: float = 0.1
    cmrr: float = 10.0
    key_adapters: str = "kv_heads"
    cache_adapted_keys: bool = True

    def validate(self) -> None:
        super().validate()
        if not isinstance(self.adapter_dim, int) or isinstance(self.adapter_dim, bool) or self.adapter_dim < 1:
            raise ConfigError(f"adapter_dim={self.adapter_dim!r}: must be an integer >= 1")
        ok = isinstance(self.adapter_scaling, (int, float)) and not isinstance(self.adapter_scaling, bool)
        if not ok or not math.isfinite(self.adapter_scaling):
            raise ConfigError(f"adapter_scaling={self.adapter_scaling!r}: must be a finite number")
        positive("adapter_dropout", self.adapter_dropout, allow_zero=True)
        if self.adapter_dropout >= 1:
            raise ConfigError(f"adapter_dropout={self.adapter_dropout!r}: must be in [0, 1)")
        positive("cmrr", self.cmrr, allow_zero=True)
        choice("key_adapters", self.key_adapters, KEY_ADAPTERS)
        boolean("cache_adapted_keys", self.cache_adapted_keys)


class Adapter(nn.Module):
    """``E(x) = x + c W2 phi(W1 dropout(x))`` on the last axis; ``W2 = 0`` makes it the identity.

    Submodule names follow the authors' ``OpampAdapterMLP`` (``adapter_down`` = ``W1``, ``adapter_up`` = ``W2``,
    both ``nn.Linear`` without bias, weights in ``(out, in)`` layout), so their tensors load without reshaping.
    Dropout is active when the caller says the model is training (the attention module's ``training`` flag: it is
    the one ``model.train()`` / ``model.eval()`` are guaranteed to have set).
    """

    def __init__(self, size: int, dim: int, scaling: float, dropout: float) -> None:
        super().__init__()
        self.adapter_down = nn.Linear(size, dim, bias=False)
        self.adapter_up = nn.Linear(dim, size, bias=False)
        self.dropout = float(dropout)
        self.scaling = float(scaling)
        nn.init.kaiming_uniform_(self.adapter_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.adapter_up.weight)

    def forward(self, x: torch.Tensor, training: bool = False) -> torch.Tensor:
        if torch.is_grad_enabled() and (x.requires_grad or self.adapter_down.weight.requires_grad):
            # Recompute the branch in the backward pass instead of keeping its activations: the dropped input
            # (as large as x, one per adapter), the bottleneck and its GELU. Only x is kept, and x is the query or
            # key the attention keeps anyway; the branch costs two thin matmuls, so the recompute is cheap. The
            # RNG state is restored for the recompute, so the dropout mask and the gradients are the same.
            branch = checkpoint(self.branch, x, training, use_reentrant=False, preserve_rng_state=True)
        else:
            branch = self.branch(x, training)
        return x + self.scaling * branch

    def branch(self, x: torch.Tensor, training: bool = False) -> torch.Tensor:
        """``W2 phi(W1 dropout(x))``, the adapter without its residual and scaling."""
        return self.adapter_up(F.gelu(self.adapter_down(F.dropout(x, self.dropout, training=training))))

    def on_heads(self, x: torch.Tensor, training: bool = False) -> torch.Tensor:
        """Apply to ``x`` (B, heads, N, d) with the heads concatenated per position: (B, N, heads * d)."""
        b, h, n, d = x.shape
        y = self(x.transpose(1, 2).reshape(b, n, h * d), training)
        return y.view(b, n, h, d).transpose(1, 2)

    def extra_repr(self) -> str:
        return f"scaling={self.scaling}, dropout={self.dropout}"


class OpAmp(MethodModule[OpAmpConfig]):
    """Two adapted query/key pairs and the OpAmp combination ``(K + 1/2) O1 - (K - 1/2) O2``."""

    # K1, K2 replace K in the cache (or, benchmark-only, K is kept and the adapters re-run).
    caches_kv = True

    def __init__(self, config: OpAmpConfig, info: LayerInfo, attn: nn.Module) -> None:
        super().__init__(config, info, attn)
        g = info.geometry
        q_size = g.num_heads * g.head_dim
        self.groups = g.num_heads // g.num_kv_heads if config.key_adapters == "repeated" else 1
        k_size = g.num_kv_heads * self.groups * g.head_dim
        args = (config.adapter_dim, config.adapter_scaling, config.adapter_dropout)
        # the authors' creation order: q1, k1, q2, k2
        self.q1_adapter = Adapter(q_size, *args)
        self.k1_adapter = Adapter(k_size, *args)
        self.q2_adapter = Adapter(q_size, *args)
        self.k2_adapter = Adapter(k_size, *args)
        self.cmrr = float(config.cmrr)

    @property
    def gain(self) -> float:
        """``A_d + A_c / 2`` with ``A_c = 1``: the coefficient of ``O1`` (``O2`` gets ``-(K - 1/2)``)."""
        return self.cmrr + 0.5

    def adapted_keys(self, key: torch.Tensor, training: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """``(K1, K2)`` of rotated keys ``key`` (B, h_kv, N, d) -> each (B, h_kv or h, N, d)."""
        if self.groups > 1:
            key = key.repeat_interleave(self.groups, dim=1)  # the authors' repeat_kv, Qwen2 layout
        return self.k1_adapter.on_heads(key, training), self.k2_adapter.on_heads(key, training)

    def store(
        self, attn: nn.Module, key: torch.Tensor, value: torch.Tensor, ctx: LayerContext
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # K1, K2 replace K (base.py: they are computed from K here, so they are cached with or without a cache)
        if not self.config.cache_adapted_keys:
            return key, value
        k1, k2 = self.adapted_keys(key, attn.training)
        return torch.cat([k1, k2], dim=-1), value

    def attend(
        self, attn: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, ctx: LayerContext,
        call: AttentionCall,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.config.cache_adapted_keys:
            k1, k2 = key.chunk(2, dim=-1)
        else:
            k1, k2 = self.adapted_keys(key, attn.training)
        q1, q2 = self.q1_adapter.on_heads(query, attn.training), self.q2_adapter.on_heads(query, attn.training)
        return call.mixed_maps(q1, k1, q2, k2, value, mix=self.mix)

    def mix(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        """``M = K (A1 - A2) + (A1 + A2) / 2 = (K + 1/2) A1 - (K - 1/2) A2`` (or the same of the outputs), written
        ``X2 + (K + 1/2)(X1 - X2)`` so that ``X1 == X2`` gives ``X2`` exactly (identity at init)."""
        return x2 + self.gain * (x1 - x2)

    def extra_repr(self) -> str:
        return f"layer={self.info.index}, cmrr={self.cmrr}"


registry.register(OpAmpConfig, OpAmp)
