"""Trainable-parameter summary split by owner: the method, peft adapters, the base model.

peft's ``print_trainable_parameters`` counts every trainable tensor together, so a method frozen by
``get_peft_model`` (or a base layer left trainable by mistake) does not show; this summary names each part.
"""

from __future__ import annotations

from typing import TypedDict

from torch import nn

from .patch import method_modules, state_of
from .wrappers import adapter_parameters, unwrap


class TrainableParameters(TypedDict):
    """Parameter counts (elements, each shared tensor counted once) of a model, by owner."""

    method: int  #: trainable parameters of the attndenoise method
    method_frozen: int  #: the method's parameters that are frozen (``peft.get_peft_model`` freezes them)
    peft: int  #: trainable parameters of peft adapters (LoRA matrices, ``modules_to_save`` copies)
    base: int  #: other trainable parameters (the base model's own)
    trainable: int  #: ``method + peft + base``
    all: int  #: every parameter, trainable or not
    percent: float  #: ``100 * trainable / all``


def _numel(p: nn.Parameter) -> int:
    # a sharded parameter (FSDP2's DTensor) reports its global size; a meta/empty one its declared size
    return int(p.numel())


def trainable_parameters(model: nn.Module) -> TrainableParameters:
    """Counts of trainable parameters by owner (see :class:`TrainableParameters`); ``model`` may be wrapped
    (PeftModel, DDP, accelerate, ``torch.compile``) and need not carry a method."""
    inner = unwrap(model)
    params = {id(p): p for p in inner.parameters()}  # parameters() already skips shared (tied) tensors
    method_ids: set[int] = set()
    if state_of(inner) is not None:
        method_ids = {id(p) for m in method_modules(inner).values() for p in m.parameters()}
    peft_ids = {id(p) for p in adapter_parameters(inner)} - method_ids
    counts = {"method": 0, "method_frozen": 0, "peft": 0, "base": 0}
    total = 0
    for i, p in params.items():
        n = _numel(p)
        total += n
        if i in method_ids:
            counts["method" if p.requires_grad else "method_frozen"] += n
        elif p.requires_grad:
            counts["peft" if i in peft_ids else "base"] += n
    trainable = counts["method"] + counts["peft"] + counts["base"]
    return TrainableParameters(
        method=counts["method"], method_frozen=counts["method_frozen"], peft=counts["peft"], base=counts["base"],
        trainable=trainable, all=total, percent=100.0 * trainable / total if total else 0.0,
    )


def format_trainable_parameters(model: nn.Module) -> str:
    """One line like peft's, with the split: ``trainable params: ... (method ..., peft ..., base ...) || ...``."""
    c = trainable_parameters(model)
    line = (f"trainable params: {c['trainable']:,} (method: {c['method']:,} || peft: {c['peft']:,} || "
            f"base: {c['base']:,}) || all params: {c['all']:,} || trainable%: {c['percent']:.4f}")
    if c["method_frozen"]:
        line += (f" || frozen method params: {c['method_frozen']:,} (call attndenoise.set_trainable(model) to train "
                 "them)")
    return line


def print_trainable_parameters(model: nn.Module) -> None:
    """Print :func:`format_trainable_parameters` (what peft users call on a ``PeftModel``)."""
    print(format_trainable_parameters(model))


__all__ = ["TrainableParameters", "trainable_parameters", "format_trainable_parameters",
           "print_trainable_parameters"]
