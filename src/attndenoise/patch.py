"""Model surgery: attach method modules to attention layers and route attention through them.

How it hooks into transformers (measured facts in shared NOTES-transformers.md):

* Attention is routed through ``AttentionInterface`` under the name ``"attndenoise"``; the same name is registered
  in ``AttentionMaskInterface`` with ``sdpa_mask`` so padding and sliding windows still reach us (without it the mask
  silently becomes ``None``). Layers without a method fall back to the implementation the model had before.
* A forward pre-hook on each patched attention module records the layer input and rotary ``(cos, sin)`` and lets the
  method prepare per-token quantities. When the method caches something extra per key (SPEC 0.6), the hook hands
  the family's forward a thin proxy of the KV cache whose ``update`` first turns the new keys/values into the
  method's stored form. The extras then live inside the ordinary cache, so cropping, beam reordering and sliding
  windows treat them exactly like the keys they belong to.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from . import registry
from .attention import bottom_right_causal, resolve_mask
from .config import MethodConfig
from .families import attention_layers, family_of, geometry, is_causal
from .methods.base import Call, LayerContext, LayerInfo, MethodModule

ATTN_IMPLEMENTATION = "attndenoise"
_SLOT = "attndenoise"  # submodule name of the method module inside an attention module


class AlreadyAppliedError(RuntimeError):
    """The model already carries an attndenoise method."""


class NotAppliedError(RuntimeError):
    """The model carries no attndenoise method."""


@dataclass
class PatchState:
    """What :func:`apply` changed, so :func:`remove` can undo it exactly."""

    config: MethodConfig
    layers: dict[int, nn.Module]
    original_impl: str
    requires_grad: dict[str, bool]
    hooks: list[Any] = field(default_factory=list)


# -- the attention function ---------------------------------------------------------------------------------------


def _wants_maps(module: nn.Module) -> bool:
    """Eager maps requested: our reference mode, or transformers collecting ``output_attentions``."""
    if getattr(module, "_ad_eager", False):
        return True
    try:
        from transformers.utils.output_capturing import _active_collector

        collected = _active_collector.get()
        return isinstance(collected, dict) and "attentions" in collected
    except (ImportError, LookupError):
        return False


def _stock_attention(
    module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
    eager: bool, **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """An unpatched layer: the implementation the model had before (or the family's eager one for maps).

    Our mask function is ``sdpa_mask`` (``None`` when causality alone suffices, bool otherwise); the family's
    eager function wants an additive float mask that always encodes causality, so convert.
    """
    impl = getattr(module, "_ad_fallback", "sdpa")
    if not eager and impl != "eager":
        return ALL_ATTENTION_FUNCTIONS[impl](module, query, key, value, mask, **kwargs)  # type: ignore[no-any-return]
    m, causal_flag = resolve_mask(mask, query.shape[-2], key.shape[-2], is_causal(module), query.device)
    if causal_flag:
        m = bottom_right_causal(query.shape[-2], key.shape[-2], query.device)
    if m is not None and m.dtype == torch.bool:
        m = torch.zeros(m.shape, dtype=query.dtype, device=query.device).masked_fill(
            ~m, torch.finfo(query.dtype).min
        )
    eager_fn = sys.modules[type(module).__module__].eager_attention_forward
    return eager_fn(module, query, key, value, m, **kwargs)  # type: ignore[no-any-return]


def attndenoise_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The function transformers calls for every attention layer once a method is applied."""
    method: MethodModule | None = getattr(module, _SLOT, None)
    eager = _wants_maps(module)
    if method is None:
        return _stock_attention(
            module, query, key, value, attention_mask, eager, scaling=scaling, dropout=dropout, **kwargs
        )
    ctx: LayerContext | None = module.__dict__.pop("_ad_ctx", None)
    if ctx is None:
        raise RuntimeError("attndenoise: attention called without its pre-hook (call the attention module itself)")
    if not ctx.cached and method.caches_kv:
        key, value = method.store(module, key, value, ctx)
    call = Call(
        mask=attention_mask, scaling=scaling, dropout=dropout, causal=is_causal(module),
        softcap=kwargs.get("softcap"), eager=eager,
    )
    out, weights = method.attend(module, query, key, value, ctx, call)
    return out.transpose(1, 2).contiguous(), weights


AttentionInterface.register(ATTN_IMPLEMENTATION, attndenoise_attention)
AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)


class _CacheProxy:
    """Stands in for the KV cache during one attention forward: new keys/values are stored in the method's form."""

    def __init__(self, cache: Any, module: nn.Module, method: MethodModule, ctx: LayerContext) -> None:
        self._cache, self._module, self._method, self._ctx = cache, module, method, ctx

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        k, v = self._method.store(self._module, key_states, value_states, self._ctx)
        return self._cache.update(k, v, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._cache, name)


_CACHE_KWARGS = ("cache", "past_key_values", "past_key_value", "layer_past")


def _pre_hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    method: MethodModule = getattr(module, _SLOT)
    hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    cache_key = next((k for k in _CACHE_KWARGS if kwargs.get(k) is not None), None)
    cache = kwargs[cache_key] if cache_key else None
    ctx = LayerContext(
        hidden_states=hidden, position_embeddings=kwargs.get("position_embeddings"), cached=cache is not None
    )
    method.prepare(module, ctx)
    setattr(module, "_ad_ctx", ctx)  # noqa: B010 (nn.Module attribute typing)
    if cache is not None and method.caches_kv:
        kwargs = dict(kwargs)
        kwargs[cache_key] = _CacheProxy(cache, module, method, ctx)  # type: ignore[index]
        return args, kwargs
    return None


# -- apply / remove -----------------------------------------------------------------------------------------------


def state_of(model: nn.Module) -> PatchState | None:
    return model.__dict__.get("_attndenoise")


def require_state(model: nn.Module) -> PatchState:
    st = state_of(model)
    if st is None:
        raise NotAppliedError("this model carries no attndenoise method (use attndenoise.apply or load first)")
    return st


def apply(model: nn.Module, config: MethodConfig, **kwargs: Any) -> nn.Module:
    """Attach ``config``'s method to the chosen layers of ``model`` (SPEC 0).

    Base parameters are frozen and the method's parameters are trainable. Extra keyword arguments go to the
    method's calibration (e.g. DEX's entropy head selection takes ``calibration_inputs``).
    Returns the same model object.
    """
    if not isinstance(config, MethodConfig):
        raise TypeError(f"apply() needs a method config (see attndenoise.config_for); got {type(config).__name__}")
    if state_of(model) is not None:
        raise AlreadyAppliedError(
            f"the model already has method '{require_state(model).config.name}'; call attndenoise.remove first"
        )
    layers = attention_layers(model)
    module_cls = registry.module_class(config)
    config = module_cls.calibrate(model, config, **kwargs)
    chosen = config.select_layers(len(layers))
    original = getattr(model.config, "_attn_implementation", None) or "sdpa"
    state = PatchState(
        config=config, layers={}, original_impl=original,
        requires_grad={n: p.requires_grad for n, p in model.named_parameters()},
    )
    for p in model.parameters():
        p.requires_grad_(False)
    for i, (_, attn) in enumerate(layers):
        setattr(attn, "_ad_fallback", original)  # noqa: B010
        if i not in chosen:
            continue
        ref = next(attn.parameters())
        info = LayerInfo(index=i, num_layers=len(layers), geometry=geometry(attn), family=family_of(attn))  # type: ignore[arg-type]
        method = module_cls(config, info).to(device=ref.device, dtype=ref.dtype)
        attn.add_module(_SLOT, method)
        state.hooks.append(attn.register_forward_pre_hook(_pre_hook, with_kwargs=True))
        state.layers[i] = attn
    setattr(model, "_attndenoise", state)  # noqa: B010
    _set_impl(model, ATTN_IMPLEMENTATION)
    return model


def _set_impl(model: Any, name: str) -> None:
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(name)
    else:  # pragma: no cover - older transformers
        model.config._attn_implementation = name


def _detach(model: nn.Module, restore_grad: bool) -> PatchState:
    st = require_state(model)
    for h in st.hooks:
        h.remove()
    for attn in st.layers.values():
        delattr(attn, _SLOT)
    for _, attn in attention_layers(model):
        attn.__dict__.pop("_ad_fallback", None)
        attn.__dict__.pop("_ad_ctx", None)
        attn.__dict__.pop("_ad_eager", None)
    del model.__dict__["_attndenoise"]
    _set_impl(model, st.original_impl)
    if restore_grad:
        for n, p in model.named_parameters():
            p.requires_grad_(st.requires_grad.get(n, True))
    return st


def remove(model: nn.Module) -> nn.Module:
    """Take the method off: the model computes exactly what the stock model computed (SPEC 0)."""
    _detach(model, restore_grad=True)
    return model


def merge(model: nn.Module) -> nn.Module:
    """Fold a mergeable method (DEX, DiffV) into the base weights, then take it off: same outputs, no extra cost."""
    st = require_state(model)
    methods = [getattr(a, _SLOT) for a in st.layers.values()]
    if not all(m.mergeable for m in methods):
        from .methods.base import NotMergeableError

        mergeable = registry.mergeable_methods()
        raise NotMergeableError(
            f"method '{st.config.name}' cannot be merged into the base weights; mergeable methods: "
            f"{', '.join(mergeable)} (use attndenoise.remove to drop it instead)"
        )
    with torch.no_grad():
        for attn, m in zip(st.layers.values(), methods, strict=True):
            m.merge_into(attn)
    _detach(model, restore_grad=True)
    return model


def method_modules(model: nn.Module) -> dict[int, MethodModule]:
    """Layer index -> method module of a patched model."""
    return {i: getattr(a, _SLOT) for i, a in require_state(model).layers.items()}


@contextlib.contextmanager
def reference_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Inside this block patched layers build explicit maps (the eager reference path) and return the method's
    effective combined map as attention weights (``output_attentions``, plots, SPEC 9 measures)."""
    layers = [a for _, a in attention_layers(model)]
    for a in layers:
        setattr(a, "_ad_eager", True)  # noqa: B010
    try:
        yield model
    finally:
        for a in layers:
            a.__dict__.pop("_ad_eager", None)
