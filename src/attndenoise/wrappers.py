"""Seeing through the wrappers users put around a model (one helper, used at every API entry point).

A patched model reaches the API inside ``peft.PeftModel`` (and its tuner), ``DistributedDataParallel`` /
``DataParallel`` (what ``accelerate``'s ``prepare`` and the Trainer return when distributed), DeepSpeed / FSDP1
engines and ``torch.compile``'s ``OptimizedModule``. The method's state lives on the transformers model inside them,
so ``apply`` on a wrapper and a later ``peft`` merge (which returns that inner model) keep one state, never an
orphaned one.

FSDP2 (``fully_shard``) does not wrap: it swaps classes in place for dynamic subclasses (family detection looks
along the MRO) and shards parameters into ``DTensor`` objects. ``save`` gathers the method's full tensors; ``apply`` /
``load`` / ``merge`` / ``remove`` on a sharded model are refused with what to do instead (:func:`refuse_fsdp2`).
"""

from __future__ import annotations

import sys

from torch import nn

#: wrappers that keep the real model as ``.module`` but are not importable without their package
_MODULE_WRAPPERS = frozenset({"FullyShardedDataParallel", "DeepSpeedEngine", "PipelineEngine"})


def _peft_inner(model: nn.Module) -> nn.Module | None:
    """The model a peft wrapper holds, or ``None`` when ``model`` is not a peft wrapper (peft never imported: none)."""
    if "peft" not in sys.modules:
        return None
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTuner

    if isinstance(model, PeftModel):
        return model.base_model  # the tuner (LoraModel, ...); unwrapped again below
    if isinstance(model, BaseTuner):
        return model.model  # type: ignore[no-any-return]
    return None


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside any number of PeftModel / DDP / DataParallel / compile wrappers."""
    for _ in range(16):  # wrappers nest a few deep at most; a bound keeps a cyclic attribute from looping
        orig = getattr(model, "_orig_mod", None)  # torch.compile's OptimizedModule
        if isinstance(orig, nn.Module):
            model = orig
            continue
        if is_data_parallel(model):
            inner = getattr(model, "module", None)
            if isinstance(inner, nn.Module):
                model = inner
                continue
        peft_inner = _peft_inner(model)
        if peft_inner is not None:
            model = peft_inner
            continue
        return model
    return model


def is_data_parallel(model: nn.Module) -> bool:
    """Whether ``model`` is a data-parallel wrapper at its outside (DDP, DataParallel, FSDP1, DeepSpeed)."""
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    return isinstance(model, DistributedDataParallel | DataParallel) or type(model).__name__ in _MODULE_WRAPPERS


def is_adapted(module: nn.Module) -> bool:
    """Whether a projection is wrapped by a peft tuner layer (LoRA, DoRA, IA3, ...): it has a ``base_layer``."""
    return isinstance(getattr(module, "base_layer", None), nn.Module)


def adapter_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters that belong to peft adapters inside ``model`` (LoRA matrices, ``modules_to_save`` copies).

    :func:`attndenoise.apply` leaves their ``requires_grad`` alone, so a LoRA and a method train together in either
    order of wrapping.
    """
    if "peft" not in sys.modules:
        return []
    from peft.tuners.tuners_utils import BaseTunerLayer

    found: dict[int, nn.Parameter] = {}
    for m in model.modules():
        if isinstance(m, BaseTunerLayer):
            for name in (*m.adapter_layer_names, *getattr(m, "other_param_names", ())):
                sub = getattr(m, name, None)
                if isinstance(sub, nn.Module):
                    found.update((id(p), p) for p in sub.parameters())
        copies = getattr(m, "modules_to_save", None)  # peft's ModulesToSaveWrapper: the trainable copies
        if isinstance(copies, nn.ModuleDict) and hasattr(m, "original_module"):
            found.update((id(p), p) for p in copies.parameters())
    return list(found.values())


class ShardedModelError(TypeError):
    """An operation that would change the parameters of an FSDP2-sharded model (FSDP would not manage them)."""


def is_fsdp2(model: nn.Module) -> bool:
    """Whether any submodule of ``model`` was sharded by FSDP2's ``fully_shard`` (torch never imported: no)."""
    if "torch.distributed.fsdp" not in sys.modules:
        return False
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in unwrap(model).modules())


def refuse_fsdp2(model: nn.Module, what: str, instead: str) -> None:
    """Raise :class:`ShardedModelError` for ``what`` on an FSDP2-sharded ``model``, saying what to do instead."""
    if is_fsdp2(model):
        raise ShardedModelError(
            f"{what} on an FSDP2-sharded model (fully_shard): FSDP manages only the parameters it sharded, so "
            f"{instead}. attndenoise.save works on a sharded model (call it on every rank; rank 0 writes)"
        )
