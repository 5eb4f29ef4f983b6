"""What a training checkpoint holds besides the Trainer's own files, and where.

Shared by :mod:`attndenoise.train` (which reads them back on ``--resume``) and :mod:`attndenoise.hf_trainer` (whose
``AtomicTrainer`` writes them); kept in a module of its own so that neither imports the other (importing the
Trainer pulls in peft, accelerate and datasets, which ``train`` only pays for inside a run).
"""

from __future__ import annotations

import torch
from torch import nn

from .patch import _SLOT as _METHOD_SLOT

# Kind method+lora: the method tensors beside peft's adapter files (peft's adapter save keeps only LoRA tensors).
CHECKPOINT_METHOD_FILE = "attndenoise_method.safetensors"
# Kinds method and none: a checkpoint holds only the trained tensors (plus optimiser, scheduler, RNG and Trainer
# state), not the whole base model.
CHECKPOINT_TRAINABLE_FILE = "attndenoise_trainable.safetensors"
# The settings (TrainConfig) a checkpoint was trained with, so --resume can refuse changed ones.
CHECKPOINT_RECORD_FILE = "attndenoise_train.json"


class TrainError(RuntimeError):
    """Training cannot start or cannot continue; the message says why and what to do."""


def checkpoint_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """What a checkpoint of kind method / none holds: every trainable parameter and every tensor of the method
    modules (their buffers, e.g. the schedule step), by state-dict name. The frozen base is not saved: a resumed run
    rebuilds it from the base model."""
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v for k, v in model.state_dict(keep_vars=True).items()
            if k in trainable or f".{_METHOD_SLOT}." in f".{k}"}


__all__ = ["CHECKPOINT_METHOD_FILE", "CHECKPOINT_RECORD_FILE", "CHECKPOINT_TRAINABLE_FILE", "TrainError",
           "checkpoint_tensors"]
