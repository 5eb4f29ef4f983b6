"""The pieces of a training run that subclass ``transformers.Trainer`` and its callbacks (SPEC 1, 0.7).

Kept apart from :mod:`attndenoise.train` and :mod:`attndenoise.schedule` because importing the Trainer pulls in
peft, accelerate and datasets (seconds): ``import attndenoise`` and applying a method never pay for it, a training
run does.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from safetensors.torch import save_file
from torch import nn
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from .io import adapter_tensors
from .schedule import current_lambdas, set_step, unwrap
from .train import CHECKPOINT_METHOD_FILE


class LambdaCallback(TrainerCallback):
    """Keeps the schedules in step with ``transformers.Trainer``'s global step and logs lambda per layer."""

    def _sync(self, state, model) -> None:  # type: ignore[no-untyped-def]
        if model is not None:
            set_step(unwrap(model), state.global_step)

    def on_train_begin(self, args, state, control, model=None, **kwargs):  # type: ignore[no-untyped-def]
        self._sync(state, model)

    def on_step_end(self, args, state, control, model=None, **kwargs):  # type: ignore[no-untyped-def]
        self._sync(state, model)

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):  # type: ignore[no-untyped-def]
        if logs is not None and model is not None:
            for name, vals in current_lambdas(unwrap(model)).items():
                logs[f"lambda/{name}"] = sum(vals) / len(vals)


class AtomicTrainer(Trainer):
    """``Trainer`` whose checkpoints appear atomically: each is written under ``.tmp-checkpoint-N`` and renamed to
    ``checkpoint-N`` once complete (every process has written its part), so ``get_last_checkpoint`` never sees a
    half-written one after a crash. For method+lora runs the method tensors go into the checkpoint too (peft's
    adapter save keeps only LoRA tensors)."""

    def __init__(self, *args: Any, method_model: nn.Module | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._method_model = method_model

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        run_dir = Path(str(self.args.output_dir))
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging = run_dir / f".tmp-{name}"
        if self.args.should_save and staging.exists():
            shutil.rmtree(staging)
        self.accelerator.wait_for_everyone()
        self.args.output_dir = str(staging)
        try:
            super()._save_checkpoint(model, trial)
            if self._method_model is not None and self.args.should_save:
                tensors = {k: v.cpu() for k, v in adapter_tensors(self._method_model).items()}
                save_file(tensors, str(staging / name / CHECKPOINT_METHOD_FILE), metadata={"format": "pt"})
        finally:
            self.args.output_dir = str(run_dir)
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            final = run_dir / name
            if final.exists():  # a re-run of the same step: replace it
                shutil.rmtree(final)
            os.replace(staging / name, final)
            shutil.rmtree(staging, ignore_errors=True)
            rotate_checkpoints(str(run_dir), save_total_limit=self.args.save_total_limit, use_mtime=False)
        self.accelerator.wait_for_everyone()


class LambdaHistory(TrainerCallback):
    """Adds lambda per layer (per head where the method has one per head) to each entry of the Trainer's log history,
    which checkpoints carry, so run.json of a resumed run holds the whole history."""

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):  # type: ignore[no-untyped-def]
        if model is None or not state.log_history:
            return
        for name, values in current_lambdas(model).items():
            state.log_history[-1][f"lambda/{name}"] = values


