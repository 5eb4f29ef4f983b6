"""The pieces of a training run that subclass ``transformers.Trainer`` and its callbacks (the lambda schedule
in step with the Trainer: docs/methods.md, section Lambda schedule).

Kept apart from :mod:`attndenoise.train` and :mod:`attndenoise.schedule` because importing the Trainer pulls in
peft, accelerate and datasets (seconds): ``import attndenoise`` and applying a method never pay for it, a training
run does.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from .checkpoints import (
    CHECKPOINT_METHOD_FILE,
    CHECKPOINT_RECORD_FILE,
    CHECKPOINT_TRAINABLE_FILE,
    TrainError,
    checkpoint_tensors,
)
from .io import adapter_tensors, copy_method_tensors_strict, copy_tensors_strict, read_tensors
from .patch import MethodFrozenError, method_modules, set_trainable, state_of
from .schedule import current_lambdas, set_step, unwrap

logger = logging.getLogger(__name__)


def lambda_logs(model: nn.Module) -> dict[str, float]:
    """``lambda/<layer module>`` -> mean lambda of that layer (a scalar, what TensorBoard / W&B can plot)."""
    return {f"lambda/{name}": sum(vals) / len(vals) for name, vals in current_lambdas(model).items() if vals}


class LambdaCallback(TrainerCallback):
    """Keeps the schedules in step with ``transformers.Trainer``'s global step and logs lambda per layer.

    * At the Trainer's ``on_init_end`` (after TRL's ``peft_config=`` wrapped the model, before the optimizer exists)
      it makes the method trainable again when ``peft.get_peft_model`` froze it (unless
      :func:`attndenoise.set_trainable` ``(model, False)`` froze it on purpose).
    * Lambda reaches ``trainer.state.log_history`` from ``on_log``. Integrations (TensorBoard, W&B) see only what is
      in the logs *before* their own ``on_log``, and the Trainer runs callbacks passed as ``callbacks=`` after
      them: use :meth:`add_to` (``ad.LambdaCallback.add_to(trainer)``), which puts the callback first, so they get
      lambda too. :func:`attndenoise.train` adds lambda in its Trainer's ``log`` itself.
    """

    @classmethod
    def add_to(cls, trainer: Trainer) -> LambdaCallback:
        """Install a LambdaCallback as the trainer's *first* callback (so integrations log lambda); returns it."""
        cb = cls()
        handler = trainer.callback_handler
        handler.callbacks = [c for c in handler.callbacks if not isinstance(c, LambdaCallback)]
        handler.callbacks.insert(0, cb)
        cb._restore_trainable(trainer.model, trainer.optimizer)
        return cb

    def _restore_trainable(self, model: nn.Module | None, optimizer: Any) -> None:
        st = state_of(model) if model is not None else None
        if model is None or st is None or st.frozen:
            return
        params = [p for m in method_modules(model).values() for p in m.parameters()]
        if not params or any(p.requires_grad for p in params):
            return
        if optimizer is not None:
            held = {id(p) for g in optimizer.param_groups for p in g["params"]}
            if not any(id(p) in held for p in params):
                raise MethodFrozenError(
                    "the attndenoise method's parameters were frozen (peft.get_peft_model) when the optimizer passed "
                    "to the Trainer was built, so it would never update them: call attndenoise.set_trainable(model) "
                    "before building the optimizer, or attndenoise.set_trainable(model, False) to train the LoRA alone"
                )
        set_trainable(model, True)
        logger.info("attndenoise: peft froze the method's parameters; LambdaCallback made them trainable again")

    def _sync(self, state, model) -> None:  # type: ignore[no-untyped-def]
        if model is not None:
            set_step(unwrap(model), state.global_step)

    def on_init_end(self, args, state, control, model=None, optimizer=None, **kwargs):  # type: ignore[no-untyped-def]
        self._restore_trainable(model, optimizer)

    def on_train_begin(self, args, state, control, model=None, **kwargs):  # type: ignore[no-untyped-def]
        self._sync(state, model)

    def on_step_end(self, args, state, control, model=None, **kwargs):  # type: ignore[no-untyped-def]
        self._sync(state, model)

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):  # type: ignore[no-untyped-def]
        if logs is None or model is None:
            return
        values = lambda_logs(model)
        logs.update(values)
        # The Trainer appended a copy of these logs to log_history just before calling on_log: add lambda there too.
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            for k, v in values.items():
                state.log_history[-1].setdefault(k, v)


class AtomicTrainer(Trainer):
    """``Trainer`` whose checkpoints appear atomically: each is written under ``.tmp-checkpoint-N`` and renamed to
    ``checkpoint-N`` once complete (every process has written its part), so ``get_last_checkpoint`` never sees a
    half-written one after a crash. For method+lora runs the method tensors go into the checkpoint too (peft's
    adapter save keeps only LoRA tensors). With ``trainable_only`` (kinds method and none) a checkpoint holds the
    trained tensors instead of the whole base model (a 7B base would cost 14 GB per checkpoint); ``record`` (the
    run's settings) is written into every checkpoint, so ``--resume`` can tell whether the settings changed. A
    non-finite loss stops training before the optimiser step (:class:`attndenoise.TrainError`)."""

    def __init__(self, *args: Any, method_model: nn.Module | None = None, trainable_only: bool = False,
                 record: dict[str, Any] | None = None, frozen: Any = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._method_model = method_model
        self._trainable_only = trainable_only
        self._record = record
        self._frozen = frozen  # an attndenoise.frozen.FrozenPrefix when batches carry "frozen_hidden"

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        hidden = inputs.pop("frozen_hidden", None)
        if hidden is None or self._frozen is None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        # The top layers on the captured hidden states, and logits only at the positions the loss reads (the answer
        # tokens): the model's own loss function gets the labels already shifted, so the value is the full loss's.
        shifted = torch.nn.functional.pad(inputs["labels"], (0, 1), value=-100)[:, 1:]
        keep = (shifted != -100).any(0).nonzero().squeeze(1)
        inputs = {**inputs, "labels": shifted[:, keep], "shift_labels": shifted[:, keep], "logits_to_keep": keep}
        with self._frozen.replay(hidden):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    def training_step(self, model: nn.Module, inputs: Any, num_items_in_batch: Any = None) -> torch.Tensor:
        loss = super().training_step(model, inputs, num_items_in_batch)
        bad = (~torch.isfinite(loss.detach())).any().to(torch.int32)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)  # every process stops together
        if bool(bad):
            raise TrainError(
                f"non-finite training loss ({float(loss):g}) at step {self.state.global_step + 1}; training stopped "
                f"before that step's update, checkpoints written so far are kept. Lower --lr (now "
                f"{self.args.learning_rate:g}), train in float32 (--dtype float32), or check the base model "
                "(a NaN or inf in its weights) and the data"
            )
        return loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # Before the callbacks and integrations run (they see the logs in this order), so TensorBoard / W&B and
        # log_history get lambda whatever the callback order.
        if self.model is not None:
            logs.update(lambda_logs(self.model))
        super().log(logs, start_time)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        if not (_internal_call and self._trainable_only):
            super().save_model(output_dir, _internal_call)
            return
        if self.args.should_save and output_dir is not None and self.model is not None:
            os.makedirs(output_dir, exist_ok=True)
            tensors = {k: v.detach().cpu().contiguous() for k, v in checkpoint_tensors(unwrap(self.model)).items()}
            save_file(tensors, os.path.join(output_dir, CHECKPOINT_TRAINABLE_FILE), metadata={"format": "pt"})

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        path = Path(resume_from_checkpoint) / CHECKPOINT_TRAINABLE_FILE
        if not (self._trainable_only and path.is_file()):
            super()._load_from_checkpoint(resume_from_checkpoint, model)
            return
        # Only the trained tensors: the frozen base came from the model itself, and loading them here does not
        # print transformers' "missing keys ['lm_head.weight']" (a tied weight a full checkpoint leaves out).
        target = model if model is not None else self.model
        assert target is not None
        copy_tensors_strict(checkpoint_tensors(unwrap(target)), read_tensors(path), path,
                            "not trained in this run")

    def restore_method(self, checkpoint_dir: str | os.PathLike[str]) -> None:
        """Before resuming from ``checkpoint_dir``: load the method tensors this trainer wrote there beside peft's
        adapter (kind method+lora; the Trainer's own resume restores everything else). No-op for other kinds."""
        if self._method_model is None:
            return
        path = Path(checkpoint_dir) / CHECKPOINT_METHOD_FILE
        copy_method_tensors_strict(self._method_model, read_tensors(path), path)

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
            if self._record is not None and self.args.should_save:
                (staging / name / CHECKPOINT_RECORD_FILE).write_text(json.dumps(self._record, indent=2) + "\n")
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


