"""Model surgery: attach method modules to attention layers and route attention through them.

How it hooks into transformers (the measured facts it relies on: docs/decisions.md, section patch.py):

* Attention is routed through ``AttentionInterface`` under the name ``"attndenoise"``; the same name is registered
  in ``AttentionMaskInterface`` with ``sdpa_mask`` so padding and sliding windows still reach us (without it the mask
  silently becomes ``None``). Layers without a method fall back to the implementation the model had before.
* A forward pre-hook on each patched attention module records the layer input and rotary ``(cos, sin)`` and lets the
  method prepare per-token quantities. When the method caches something extra per key (docs/methods.md, section
  Caching), the hook hands the family's forward a thin proxy of the KV cache whose ``update`` first turns the new
  keys/values into the method's stored form. The extras then live inside the ordinary cache, so cropping, beam
  reordering and sliding windows treat them exactly like the keys they belong to.
"""

from __future__ import annotations

import contextlib
import types
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from . import registry
from .attention import resolve_mask, top_left_causal
from .config import MethodConfig
from .families import attention_layers, geometry, is_causal, modelling_module
from .methods.base import AttentionCall, LayerContext, LayerInfo, MethodModule, NotMergeableError
from .wrappers import adapter_parameters, is_adapted, is_data_parallel, refuse_fsdp2, unwrap

ATTN_IMPLEMENTATION = "attndenoise"
_SLOT = "attndenoise"  # submodule name of the method module inside an attention module


class AlreadyAppliedError(RuntimeError):
    """The model already carries an attndenoise method."""


class NotAppliedError(RuntimeError):
    """The model carries no attndenoise method."""


class MethodFrozenError(RuntimeError):
    """A training forward runs while every parameter of the method is frozen (``peft.get_peft_model`` does that)."""


class MethodDroppedWarning(UserWarning):
    """``model.save_pretrained`` on a patched model: stock loading of that folder drops the method."""


@dataclass
class PatchState:
    """What :func:`apply` changed, so :func:`remove` can undo it exactly."""

    config: MethodConfig
    layers: dict[int, nn.Module]
    original_impl: str
    requires_grad: dict[str, bool]
    hooks: list[Any] = field(default_factory=list)
    #: set by :func:`set_trainable` ``(model, False)``: the method is frozen on purpose (e.g. train only a LoRA)
    frozen: bool = False


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
        m = top_left_causal(query.shape[-2], key.shape[-2], query.device)
    if m is not None and m.dtype == torch.bool:
        m = torch.zeros(m.shape, dtype=query.dtype, device=query.device).masked_fill(
            ~m, torch.finfo(query.dtype).min
        )
    eager_fn = modelling_module(module).eager_attention_forward
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
    method: MethodModule[Any] | None = getattr(module, _SLOT, None)
    eager = _wants_maps(module)
    if method is None:
        return _stock_attention(
            module, query, key, value, attention_mask, eager, scaling=scaling, dropout=dropout, **kwargs
        )
    ctx: LayerContext | None = module.__dict__.pop("_ad_ctx", None)
    if ctx is None:
        raise RuntimeError("attndenoise: attention called without its pre-hook (call the attention module itself)")
    if not ctx.has_cache and method.caches_kv:
        # without a cache, store runs here; under one it ran in _CacheProxy.update (methods/base.py: exactly once)
        key, value = method.store(module, key, value, ctx)
    call = AttentionCall(
        mask=attention_mask, scaling=scaling, dropout=dropout, causal=is_causal(module),
        softcap=kwargs.get("softcap"), eager=eager,
    )
    out, weights = method.attend(module, query, key, value, ctx, call)
    return out.transpose(1, 2).contiguous(), weights


AttentionInterface.register(ATTN_IMPLEMENTATION, attndenoise_attention)
AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)


class _CacheProxy:
    """Stands in for the KV cache during one attention forward: new keys/values are stored in the method's form."""

    def __init__(self, cache: Any, module: nn.Module, method: MethodModule[Any], ctx: LayerContext) -> None:
        self._cache, self._module, self._method, self._ctx = cache, module, method, ctx

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        k, v = self._method.store(self._module, key_states, value_states, self._ctx)
        return self._cache.update(k, v, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._cache, name)


_CACHE_KWARGS = ("cache", "past_key_values", "past_key_value", "layer_past")


def _check_trainable(method: MethodModule[Any]) -> None:
    """Refuse a training forward of a method whose parameters were all frozen behind its back.

    ``peft.get_peft_model`` (and TRL's ``peft_config=``) sets ``requires_grad=False`` on every non-LoRA parameter,
    the method's included, and says nothing: without this check the method silently stays at its initial value.
    """
    if not (method.training and torch.is_grad_enabled()) or getattr(method, "_ad_frozen", False):
        return
    params = list(method.parameters())
    if params and not any(p.requires_grad for p in params):
        raise MethodFrozenError(
            f"training forward with every parameter of the attndenoise method '{method.config.name}' frozen "
            "(peft.get_peft_model freezes all non-LoRA parameters). Call attndenoise.set_trainable(model) after "
            "get_peft_model and before creating the optimizer (a Trainer with attndenoise.LambdaCallback() does it "
            "for you), or apply the method after wrapping with peft; to train the LoRA alone on purpose call "
            "attndenoise.set_trainable(model, False)"
        )


def _pre_hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    if module.__dict__.get("_ad_off", False):  # inside attndenoise.disabled: the stock layer, untouched inputs
        return None
    method: MethodModule[Any] = getattr(module, _SLOT)
    _check_trainable(method)
    hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    cache_key = next((k for k in _CACHE_KWARGS if kwargs.get(k) is not None), None)
    cache = kwargs[cache_key] if cache_key else None
    if cache is not None:
        method.check_cache(module, cache)
    ctx = LayerContext(
        hidden_states=hidden, position_embeddings=kwargs.get("position_embeddings"), has_cache=cache is not None
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
    """The patch state of ``model`` (seen through peft / DDP / compile wrappers), or ``None``."""
    return unwrap(model).__dict__.get("_attndenoise")


def require_state(model: nn.Module) -> PatchState:
    st = state_of(model)
    if st is None:
        raise NotAppliedError("this model carries no attndenoise method (use attndenoise.apply or load first)")
    return st


def apply(model: nn.Module, config: MethodConfig, **kwargs: Any) -> nn.Module:
    """Attach ``config``'s method to the chosen layers of ``model`` (docs/methods.md, section Shared rules).

    Base parameters are frozen and the method's parameters are trainable; peft adapter parameters (a LoRA applied
    before) keep their ``requires_grad``, so method and LoRA train together. ``model`` may be wrapped (PeftModel,
    DDP, ``torch.compile``): the method goes onto the transformers model inside, where a peft merge keeps it.
    Extra keyword arguments go to the method's calibration (e.g. DEX's entropy head selection takes
    ``calibration_inputs``). Returns the same model object.
    """
    if not isinstance(config, MethodConfig):
        raise TypeError(f"apply() needs a method config (see attndenoise.config_for); got {type(config).__name__}")
    if state_of(model) is not None:
        raise AlreadyAppliedError(
            f"the model already has method '{require_state(model).config.name}'; call attndenoise.remove first"
        )
    if is_data_parallel(model):
        # DDP registered its parameters when it was built: the method's would get no gradient all-reduce, and the
        # processes would drift apart silently
        raise TypeError(f"apply() on a {type(model).__name__}-wrapped model: apply the method first, then wrap "
                        "(DDP / accelerate's prepare / the Trainer do the wrapping for you)")
    refuse_fsdp2(model, "apply() (and load())", "apply or load the method before fully_shard")
    given, model = model, unwrap(model)
    layers = attention_layers(model)
    module_cls = registry.module_class(config)
    config = module_cls.calibrate(model, config, **kwargs)
    chosen = config.select_layers(len(layers))
    # Every method module is built before the model is touched: a constructor that refuses this model (DIFF's
    # pairing on an odd number of heads) leaves it as it was, instead of frozen and half-patched.
    methods: dict[int, MethodModule[Any]] = {}
    for i in chosen:
        attn = layers[i][1]
        ref = next(attn.parameters())
        info = LayerInfo(index=i, num_layers=len(layers), geometry=geometry(attn))
        methods[i] = module_cls(config, info, attn).to(device=ref.device, dtype=ref.dtype)
    original = getattr(model.config, "_attn_implementation", None) or "sdpa"
    state = PatchState(
        config=config, layers={}, original_impl=original,
        requires_grad={n: p.requires_grad for n, p in model.named_parameters()},
    )
    keep = {id(p) for p in adapter_parameters(model)}
    for p in model.parameters():
        if id(p) not in keep:
            p.requires_grad_(False)
    for i, (_, attn) in enumerate(layers):
        setattr(attn, "_ad_fallback", original)  # noqa: B010
        if i not in methods:
            continue
        attn.add_module(_SLOT, methods[i])
        state.hooks.append(attn.register_forward_pre_hook(_pre_hook, with_kwargs=True))
        state.layers[i] = attn
    setattr(model, "_attndenoise", state)  # noqa: B010
    _set_impl(model, ATTN_IMPLEMENTATION)
    if callable(getattr(model, "save_pretrained", None)):
        # an instance attribute, removed by remove/merge; a bound method, so deepcopy rebinds it to the copy
        setattr(model, "save_pretrained", types.MethodType(_warning_save_pretrained, model))  # noqa: B010
    return given


def _warning_save_pretrained(self: nn.Module, save_directory: Any, *args: Any, **kwargs: Any) -> Any:
    """``save_pretrained`` of a patched model: saves as transformers does, adds the adapter files, warns."""
    warnings.warn(
        f"save_pretrained on a model patched with attndenoise method '{require_state(self).config.name}': "
        "AutoModelForCausalLM.from_pretrained on that folder silently drops the method (its tensors are reported "
        "as UNEXPECTED keys). The folder also holds the attndenoise adapter files: load it with "
        "attndenoise.from_pretrained(folder), and save with attndenoise.save_pretrained(model, folder)",
        MethodDroppedWarning, stacklevel=2,
    )
    out = type(self).save_pretrained(self, save_directory, *args, **kwargs)  # type: ignore[attr-defined]
    if kwargs.get("is_main_process", True):
        from .io import save

        save(self, save_directory)
    return out


_warning_save_pretrained.__name__ = "save_pretrained"  # so pickle re-binds the class's method, not a missing name


def _set_impl(model: Any, name: str) -> None:
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(name)
    else:  # pragma: no cover - older transformers
        model.config._attn_implementation = name


def _detach(model: nn.Module, restore_grad: bool) -> PatchState:
    st = require_state(model)
    refuse_fsdp2(model, "remove() / merge()", "do it on an unsharded model (e.g. load the saved adapter into a "
                 "stock copy with attndenoise.load)")
    model = unwrap(model)
    for h in st.hooks:
        h.remove()
    for attn in st.layers.values():
        delattr(attn, _SLOT)
    for _, attn in attention_layers(model):
        attn.__dict__.pop("_ad_fallback", None)
        attn.__dict__.pop("_ad_ctx", None)
        attn.__dict__.pop("_ad_eager", None)
        attn.__dict__.pop("_ad_off", None)
    del model.__dict__["_attndenoise"]
    model.__dict__.pop("save_pretrained", None)
    _set_impl(model, st.original_impl)
    if restore_grad:
        # by name; a parameter renamed since (peft wraps q_proj as q_proj.base_layer) keeps its current state
        for n, p in model.named_parameters():
            p.requires_grad_(st.requires_grad.get(n, p.requires_grad))
    return st


def remove(model: nn.Module) -> nn.Module:
    """Take the method off: the model computes exactly what the stock model computed."""
    _detach(model, restore_grad=True)
    return model


def merge(model: nn.Module) -> nn.Module:
    """Fold a method with ``mergeable = True`` into the base weights, then take it off: same outputs, no extra
    cost (see :func:`attndenoise.registry.mergeable_methods`)."""
    st = require_state(model)
    refuse_fsdp2(model, "merge()", "merge on an unsharded model (load the saved adapter into a stock copy)")
    methods = [getattr(a, _SLOT) for a in st.layers.values()]
    if not all(m.mergeable for m in methods):
        mergeable = registry.mergeable_methods()
        raise NotMergeableError(
            f"method '{st.config.name}' cannot be merged into the base weights; mergeable methods: "
            f"{', '.join(mergeable)} (use attndenoise.remove to drop it instead)"
        )
    adapted = sorted({n for a in st.layers.values() for n, c in a.named_children() if is_adapted(c)})
    if adapted:
        # folding into the base weight under a LoRA would leave the LoRA's delta untransformed: outputs would change
        raise NotMergeableError(
            f"the attention projections ({', '.join(adapted)}) carry a peft adapter: merge it first "
            "(model = peft_model.merge_and_unload()), then call attndenoise.merge(model)"
        )
    with torch.no_grad():
        for attn, m in zip(st.layers.values(), methods, strict=True):
            m.merge_into(attn)
    _detach(model, restore_grad=True)
    return model


def method_modules(model: nn.Module) -> dict[int, MethodModule[Any]]:
    """Layer index -> method module of a patched model."""
    return {i: getattr(a, _SLOT) for i, a in require_state(model).layers.items()}


def set_trainable(model: nn.Module, trainable: bool = True) -> nn.Module:
    """Make the method's parameters trainable (again) or freeze them on purpose.

    ``True`` undoes the freeze of ``peft.get_peft_model`` (which sets ``requires_grad=False`` on everything but
    the LoRA); call it before the optimizer is created. ``False`` freezes the method and declares it intended, so a
    training forward does not raise :class:`MethodFrozenError` (e.g. to train only a LoRA under a trained method).
    """
    st = require_state(model)
    st.frozen = not trainable
    for m in method_modules(model).values():
        m.__dict__["_ad_frozen"] = not trainable
        for p in m.parameters():
            p.requires_grad_(trainable)
    return model


@contextlib.contextmanager
def disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Inside this block the model computes exactly what the stock model computes; the method (its tensors, the
    optimiser's references to them, the schedule step) stays attached and is back unchanged afterwards, also after
    an exception (peft's ``disable_adapter`` for attndenoise: compare against the base without reloading it).

    The model's original attention implementation is switched back in and the method's pre-hooks pass through,
    so no method code runs (a KV cache built inside holds stock keys and values: do not reuse it outside).
    """
    st = require_state(model)
    base = unwrap(model)
    layers = list(st.layers.values())
    prev_flags = [a.__dict__.get("_ad_off", False) for a in layers]
    prev_impl = getattr(base.config, "_attn_implementation", None) or ATTN_IMPLEMENTATION
    for a in layers:
        setattr(a, "_ad_off", True)  # noqa: B010
    _set_impl(base, st.original_impl)
    try:
        yield model
    finally:
        if state_of(base) is st:  # not removed or merged inside the block (that restored the stock model itself)
            for a, flag in zip(layers, prev_flags, strict=True):
                if flag:
                    setattr(a, "_ad_off", True)  # noqa: B010
                else:
                    a.__dict__.pop("_ad_off", None)
            _set_impl(base, prev_impl)


@contextlib.contextmanager
def reference_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Inside this block patched layers build explicit maps (the eager reference path) and return the method's
    effective combined map as attention weights (``output_attentions``, plots, attention measures)."""
    layers = [a for _, a in attention_layers(unwrap(model))]
    for a in layers:
        setattr(a, "_ad_eager", True)  # noqa: B010
    try:
        yield model
    finally:
        for a in layers:
            a.__dict__.pop("_ad_eager", None)
