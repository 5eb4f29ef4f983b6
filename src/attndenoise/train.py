"""Training: one entry point for every method and the two baselines, built on ``transformers.Trainer``.

Five kinds of run share the same data, step budget and optimiser, so their results compare fairly (compare within a
protocol: ``method+attn`` against ``none``, ``method+lora`` against ``lora``):

* ``method``: an attndenoise method (``daa``, ``dex``, ...); only its parameters train.
* ``method+attn``: the method and the patched layers' attention projections (q, k, v, o; optionally ``lm_head``)
  train together: the protocol of "Differential Attention for Pretrained LLMs" appendix D ("we fine-tuned only the
  parameters within the attention modules"; self-attention plus lm_head for its Llama runs), whose baseline is
  ``none`` (the same training without the method).
* ``method+lora``: a method with a peft LoRA on the attention projections under it; both train (the OpAmp paper
  trains its adapters together with QLoRA).
* ``lora``: peft LoRA on the attention projections, nothing else (baseline).
* ``none``: plain fine-tuning of the attention projections (q/k/v/o), everything else frozen (baseline).

The output directory ends up holding::

    run.json                              kind, method, config, base model, steps, loss/lambda history, seconds
    attndenoise_config.json + attndenoise_model.safetensors   the method adapter (attndenoise.save), method kinds
    lora/                                 the peft adapter, LoRA kinds
    projections.safetensors               the trained projection tensors, kinds none and method+attn
    checkpoint-N/                         Trainer checkpoints (each renamed into place only once complete)

:func:`load_trained` turns any of these back into a trained model. ``run.json`` is written last, so a directory with
it holds a finished run.

Data order is fixed before training (seeded epoch permutations laid out end to end, read sequentially), so a run
under ``torchrun`` with ``W`` processes of batch ``B`` sees exactly the batches of a one-process run of batch ``W*B``,
and a resumed run sees the batches it would have seen uninterrupted.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import json
import math
import os
import random
import shutil
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import Dataset

from . import registry
from .checkpoints import (  # noqa: F401 - CHECKPOINT_* and checkpoint_tensors: part of this module's namespace
    CHECKPOINT_METHOD_FILE,
    CHECKPOINT_RECORD_FILE,
    CHECKPOINT_TRAINABLE_FILE,
    TrainError,
    checkpoint_tensors,
)
from .config import ConfigError, MethodConfig
from .data import (
    DEFAULT_FORMAT,
    ChatExample,
    Example,
    NoisyExample,
    SyntheticQA,
    collate,
    encode_examples,
    examples_from_records,
    load_examples,
    noisy_examples,
    warn_unknown_tokens,
)
from .data.formatting import PromptFormat
from .families import attention_layers
from .io import AdapterLoadError, base_signature, check_base_signature, copy_tensors_strict, load, read_tensors, save
from .patch import apply, remove, state_of
from .schedule import current_lambdas

if TYPE_CHECKING:
    from transformers import TrainerCallback

BASELINES = ("none", "lora")
KINDS = ("method", "method+attn", "method+lora", "lora", "none")
RUN_FILE = "run.json"
LORA_DIR = "lora"
PROJECTIONS_FILE = "projections.safetensors"
# Fields that may change on --resume without changing what is trained.
RESUME_FREE = ("out", "resume", "force_resume", "progress", "save_steps", "save_total_limit", "logging_steps")
RUN_FORMAT = 1
SYNTHETIC = "synthetic"
SYNTHETIC_DEFAULT_NOISE = 0.8
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_SCHEDULERS = ("linear", "constant", "constant_with_warmup", "cosine")


def known_methods() -> list[str]:
    """Every name ``TrainConfig.method`` accepts: the baselines, then the registered methods."""
    return [*BASELINES, *sorted(registry.METHODS)]


@dataclass
class TrainConfig:
    """Everything that determines a training run (recorded in ``run.json``).

    Attributes:
        model: the base causal LM (with its tokenizer): ``"tiny"`` (the embedded model, the default),
            ``"smollm2-135m"``, a ``.gguf`` file, a local folder or a hub id (``attndenoise.models.resolve_model``).
        method: a registered method name, or the baselines ``"none"`` (fine-tune q/k/v/o) / ``"lora"``.
        data: a data file or ``datasets`` folder (see ``attndenoise.data.load_examples``), or ``"synthetic"``.
            :func:`train` also takes in-memory records here (a ``datasets.Dataset`` or a list of dicts); the config
            then records ``"<in-memory: N records, sha256 ...>"`` (see :func:`in_memory_label`).
        out: output directory.
        method_options: fields of the method's config (``anneal_steps``, ``layers``, ...).
        noise: noise ratio of the training contexts (distractors from the example's own list, then from other
            examples); ``None`` keeps file examples as they are and means 0.8 for the synthetic data.
        noise_mix: a noise mix instead of one ratio: each training example gets a ratio drawn uniformly (seeded)
            from this list, e.g. ``[0.5, 0.8, 0.9]``. Overrides ``noise``.
        steps: optimiser steps. batch_size: examples per device per micro-batch. grad_accum: micro-batches per step.
        max_length: tokens per example; longer ones lose distractors first, and are skipped when even the gold
            documents do not fit.
        save_steps: checkpoint every this many steps (``save_total_limit`` of them are kept).
        resume: continue from the last checkpoint in ``out`` (start fresh when there is none). The settings recorded
            in the checkpoint must equal these (all fields but ``RESUME_FREE``: out, progress, save and logging
            steps); a difference raises :class:`TrainError` naming the fields. Resuming a finished run changes
            nothing and returns it.
        force_resume: resume even though the settings differ; the differences go into ``run.json``
            (``resume_overrides``).
        split / distractors / distractor_kind: for multi-document QA data (``question`` / ``answers`` / ``ctxs``
            records, e.g. NaturalQuestions): train on this split of the fixed 70/10/20 split (default ``train``
            when ``distractors`` is given), each question with its gold passage at a seeded random position among
            ``distractors`` passages, ``"hard"`` (BM25's best answer-free passages) or ``"random"``, drawn from every
            question's gold passage (``attndenoise.data.retrieval``). Not with ``noise``.
        prompt: ``"litm"`` (the *Lost in the Middle* instruction and ``Document [i](Title: t)`` lines),
            ``"default"`` (``Document [i]:`` lines), or ``"auto"``: ``litm`` for data read with ``distractors`` /
            ``split``, else ``default``.
        attention: train the patched layers' attention projections (q, k, v, o) together with the method (kind
            ``method+attn``, the DAA paper's protocol; its baseline is ``none``). Not with ``lora``.
        lm_head: with ``attention``, train ``lm_head`` too (the DAA paper's Llama runs); with tied embeddings that
            is the input embedding matrix.
        top_layers: change only the top ``k`` decoder layers: the method patches them (unless ``method_options``
            sets ``layers``, which must then lie in them), ``none`` / ``--attention`` / LoRA train only their
            projections. The frozen layers below run once per training example, not once per step: their output
            is captured before training (``attndenoise.frozen``) and cached on disk under the cache folder, keyed by
            the base model, the split and the tokens, so every run on the same data reuses it; each step then runs
            the top layers alone and computes logits only where the loss reads them. The papers patch every layer;
            this is an option for a small compute budget. Not with a tied ``lm_head``.
        method_lr: with ``attention`` or ``lora``, the learning rate of the method's own parameters, while the
            projections or the LoRA train at ``learning_rate`` (so a comparison with the protocol's baseline keeps
            the baseline's rate for the parameters both train); ``None``: everything at ``learning_rate``.
        lora / lora_rank / lora_alpha / lora_dropout: stack a peft LoRA on the attention projections under the method.
        qlora: LoRA over a 4-bit base (CUDA and bitsandbytes only).
        synthetic_examples: how many synthetic training examples to generate.
        warmup_steps / weight_decay / lr_scheduler (linear, constant, constant_with_warmup, cosine): the optimiser
            schedule. dtype: float32, bfloat16 or float16 for the base model.

    Lambda schedule: when ``method_options`` does not set ``anneal_steps``, a method with a lambda schedule anneals
    over the whole run (``anneal_steps = steps``) instead of the library's 1000 steps, which a short run would end
    far from (lambda ~0.02 after 30 steps). The literal ``"paper"`` schedule ends at ``lambda_learn`` (0 at init),
    so a short run still ends near the base model (measured on the tiny model, 100 steps x 4 examples: EM at noise
    0.9 0.82, the base's 0.82); ``lambda_schedule="linear"`` ends at ``lambda_init + lambda_learn`` and needs more
    training than that (0.26 there; the demo's 150 x 16 examples at lr 2e-3 gain for daa, diffq, diffk, diff, dint).
    On the validation split (``SyntheticQA(0, split="val")``, 100 questions, EM at noise 0.8 / 0.9; 2 loaded CPU
    cores): base 0.98 / 0.65, these defaults 0.98 / 0.65, ``lambda_schedule="linear"`` at lr 3e-4 0.14 / 0.06; no
    cheap default beat the base, so ``attndenoise train`` prints a one-line note naming the fix
    (``attndenoise.cli.train.lambda_note``).
    """

    model: str = "tiny"
    method: str = "daa"
    data: str = SYNTHETIC
    out: str = "run"
    method_options: dict[str, Any] = field(default_factory=dict)
    noise: float | None = None
    noise_mix: list[float] | None = None
    steps: int = 100
    learning_rate: float = 1e-3
    batch_size: int = 4
    grad_accum: int = 1
    max_length: int = 512
    seed: int = 0
    save_steps: int = 50
    save_total_limit: int = 2
    resume: bool = False
    force_resume: bool = False
    split: str | None = None
    distractors: int | None = None
    distractor_kind: str = "hard"
    prompt: str = "auto"
    attention: bool = False
    lm_head: bool = False
    top_layers: int | None = None
    method_lr: float | None = None
    lora: bool = False
    lora_rank: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    qlora: bool = False
    synthetic_examples: int = 1000
    warmup_steps: int = 0
    weight_decay: float = 0.0
    lr_scheduler: str = "linear"
    logging_steps: int = 10
    dtype: str = "float32"
    progress: bool = True

    def __post_init__(self) -> None:
        self.validate()

    @property
    def kind(self) -> str:
        """``"none"``, ``"lora"``, ``"method+lora"``, ``"method+attn"`` or ``"method"``."""
        if self.method in BASELINES:
            return self.method
        if self.lora or self.qlora:
            return "method+lora"
        return "method+attn" if self.attention else "method"

    def method_config(self) -> MethodConfig | None:
        """The validated method config, or ``None`` for the baselines."""
        if self.method in BASELINES:
            return None
        options = dict(self.method_options)
        steps_ok = isinstance(self.steps, int) and not isinstance(self.steps, bool) and self.steps >= 1
        if "anneal_steps" not in options and steps_ok and registry.config_class(self.method).uses_lambda_schedule:
            options["anneal_steps"] = self.steps  # the ramp follows the run length (class docstring)
        top_ok = isinstance(self.top_layers, int) and not isinstance(self.top_layers, bool) and self.top_layers >= 1
        if top_ok and "layers" not in options:
            options["layers"] = list(range(-int(self.top_layers), 0))  # type: ignore[arg-type]
        return registry.config_for(self.method, **options)

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the bad field and what is accepted."""
        # Types first: values from a --config file or a dict are not checked by anything else.
        for name in ("model", "method", "data", "out", "lr_scheduler", "dtype"):
            if not isinstance(getattr(self, name), str):
                raise ConfigError(f"{name}={getattr(self, name)!r}: must be a string")
        if not isinstance(self.method_options, dict):
            raise ConfigError(f"method_options={self.method_options!r}: must be a mapping of method config fields")
        for name in ("resume", "force_resume", "lora", "qlora", "progress"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name}={getattr(self, name)!r}: must be true or false")
        for name in ("lora_dropout", "weight_decay"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
                raise ConfigError(f"{name}={v!r}: must be a number")
        if self.noise is not None and (isinstance(self.noise, bool) or not isinstance(self.noise, int | float)):
            raise ConfigError(f"noise={self.noise!r}: must be a ratio in [0, 1) (0.8 = four distractors per gold)")
        if self.method not in known_methods():
            raise ConfigError(f"unknown method '{self.method}'; known methods: {', '.join(known_methods())}")
        if self.method in BASELINES:
            if self.method_options:
                raise ConfigError(f"method '{self.method}' is a baseline and takes no method options "
                                  f"(got {', '.join(sorted(self.method_options))})")
            if self.lora:
                raise ConfigError(f"--lora stacks LoRA under a method; with method '{self.method}' use "
                                  "--method lora for plain LoRA")
            if self.qlora and self.method == "none":
                raise ConfigError("--qlora trains a LoRA; it does not combine with method 'none'")
            if self.attention:
                raise ConfigError(f"--attention trains the attention projections with a method; method "
                                  f"'{self.method}' is a baseline ('none' already trains them)")
        else:
            cfg = self.method_config()  # raises ConfigError for unknown fields / bad values
            if self.attention and (self.lora or self.qlora):
                raise ConfigError("--attention and --lora are two protocols (method + attention fine-tuning, "
                                  "method + LoRA); choose one")
            assert cfg is not None
            if not cfg.trainable and self.kind == "method":
                raise ConfigError(f"method '{self.method}' has no trainable parameters (inference only); "
                                  "add --lora to train a LoRA under it, or use it without training")
        for name in ("steps", "batch_size", "grad_accum", "max_length", "save_steps", "save_total_limit",
                     "lora_rank", "synthetic_examples", "logging_steps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name}={v!r}: must be an integer >= 1")
        for name in ("warmup_steps", "seed"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ConfigError(f"{name}={v!r}: must be an integer >= 0")
        if isinstance(self.lora_alpha, bool) or not isinstance(self.lora_alpha, int) or self.lora_alpha < 1:
            raise ConfigError(f"lora_alpha={self.lora_alpha!r}: must be an integer >= 1")
        for name in ("learning_rate", "method_lr"):
            v = getattr(self, name)
            if name == "method_lr" and v is None:
                continue
            if not isinstance(v, int | float) or isinstance(v, bool) or not math.isfinite(v) or v <= 0:
                raise ConfigError(f"{name}={v!r}: must be a number > 0")
        if self.method_lr is not None and self.kind not in ("method+attn", "method+lora"):
            raise ConfigError("method_lr sets the method's own rate beside the projections or a LoRA; it needs "
                              "--attention or --lora (for a method alone, set --lr)")
        if not 0.0 <= self.lora_dropout < 1.0 or not 0.0 <= self.weight_decay:
            raise ConfigError("lora_dropout must be in [0, 1) and weight_decay >= 0")
        if self.noise is not None and (isinstance(self.noise, bool) or not 0.0 <= self.noise < 1.0):
            raise ConfigError(f"noise={self.noise!r}: must be a ratio in [0, 1) (0.8 = four distractors per gold)")
        if self.noise_mix is not None:
            if isinstance(self.noise_mix, str | bytes) or not list(self.noise_mix):
                raise ConfigError(f"noise_mix={self.noise_mix!r}: give a non-empty list of ratios in [0, 1)")
            for r in self.noise_mix:
                if isinstance(r, bool) or not isinstance(r, int | float) or not 0.0 <= r < 1.0:
                    raise ConfigError(f"noise_mix={self.noise_mix!r}: every ratio must be in [0, 1)")
        if self.top_layers is not None and (isinstance(self.top_layers, bool) or not isinstance(
                self.top_layers, int) or self.top_layers < 1):
            raise ConfigError(f"top_layers={self.top_layers!r}: must be an integer >= 1 (unset: all layers)")
        if self.split is not None and self.split not in ("train", "validation", "test"):
            raise ConfigError(f"split={self.split!r}; choose one of train, validation, test")
        if self.distractors is not None and (isinstance(self.distractors, bool) or not isinstance(
                self.distractors, int) or self.distractors < 0):
            raise ConfigError(f"distractors={self.distractors!r}: must be an integer >= 0")
        if self.distractor_kind not in ("hard", "random"):
            raise ConfigError(f"distractor_kind={self.distractor_kind!r}; choose one of hard, random")
        if self.prompt not in ("auto", "default", "litm"):
            raise ConfigError(f"prompt={self.prompt!r}; choose one of auto, default, litm")
        if (self.split is not None or self.distractors is not None) and (
                self.noise is not None or self.noise_mix is not None):
            raise ConfigError("--distractors/--split build retrieval contexts; they do not combine with --noise")
        if self.lr_scheduler not in _SCHEDULERS:
            raise ConfigError(f"lr_scheduler={self.lr_scheduler!r}; choose one of {', '.join(_SCHEDULERS)}")
        if self.dtype not in _DTYPES:
            raise ConfigError(f"dtype={self.dtype!r}; choose one of {', '.join(_DTYPES)}")
        if not self.out:
            raise ConfigError("out: give an output directory")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class TrainResult:
    """What :func:`train` returns: the run directory, its ``run.json`` content and the trained model in memory
    (a ``peft.PeftModel`` for the LoRA kinds)."""

    out_dir: Path
    run: dict[str, Any]
    model: nn.Module
    main_process: bool = True  # False on the other processes of a distributed run
    already_finished: bool = False  # --resume of a run that had finished: nothing was trained or written


# -- data -----------------------------------------------------------------------------------------------------------


class _OrderedDataset(Dataset):
    """Encoded examples in a fixed, precomputed order (read sequentially by the Trainer)."""

    def __init__(self, features: list[dict[str, list[int]]], order: list[int]) -> None:
        self.features, self.order = features, order

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        return self.features[self.order[i]]


def training_order(num_examples: int, total: int, seed: int) -> list[int]:
    """``total`` example indices: seeded permutations of ``range(num_examples)`` laid end to end.

    Fixing the order up front (instead of a sampler's shuffle) makes it independent of the process count and of
    where a run was resumed.
    """
    rng = random.Random(f"attndenoise-train-order:{seed}")
    order: list[int] = []
    while len(order) < total:
        perm = list(range(num_examples))
        rng.shuffle(perm)
        order.extend(perm)
    return order[:total]


def in_memory_label(records: Sequence[Any]) -> str:
    """What ``run.json`` records for in-memory training data: the record count and a hash of the content, so the
    record is honest (no file name pretends to be the source) and ``--resume`` notices other records."""
    import hashlib

    digest = hashlib.sha256()
    for rec in records:
        digest.update(json.dumps(dict(rec), sort_keys=True, default=str).encode())
        digest.update(b"\n")
    return f"<in-memory: {len(records)} records, sha256 {digest.hexdigest()[:16]}>"


def load_training_examples(config: TrainConfig, records: Sequence[Any] | None = None) -> list[Example]:
    """The raw examples of ``config.data`` (or of in-memory ``records``) with the noise ratio applied (no tokenizer
    needed yet)."""
    if records is None and (config.split is not None or config.distractors is not None):
        return _retrieval_examples(config)
    if records is not None:
        examples: list[Example] = examples_from_records(records, source="data")
        noise: float | list[float] | None = config.noise
    elif config.data == SYNTHETIC:
        examples = list(SyntheticQA(config.seed, split="train").examples(config.synthetic_examples))
        noise = SYNTHETIC_DEFAULT_NOISE if config.noise is None else config.noise
    else:
        path = Path(config.data)
        if not path.exists():
            raise FileNotFoundError(f"no such data file: {path} (give a .jsonl/.json/.csv/.parquet file, a "
                                    f"datasets folder, or '{SYNTHETIC}')")
        examples = load_examples(path)
        noise = config.noise
    if config.noise_mix is not None:
        noise = [float(r) for r in config.noise_mix]
    if not examples:
        raise TrainError(f"{config.data}: no training examples")
    if noise is None:
        return examples
    chats = sum(isinstance(e, ChatExample) for e in examples)
    if chats:
        raise TrainError(f"{config.data}: --noise builds document contexts, but {chats} example(s) are chat "
                         "examples; drop --noise for chat data")
    docs = [e for e in examples if isinstance(e, NoisyExample)]
    return list(noisy_examples(docs, noise, seed=config.seed))


def _retrieval_examples(config: TrainConfig) -> list[Example]:
    """Multi-document QA questions of one split with their gold passage among ``config.distractors`` passages."""
    from .data.retrieval import PassagePool, multidoc_examples, read_multidoc_qa, split_records

    path = Path(config.data)
    if not path.is_file():
        raise FileNotFoundError(f"no such data file: {path} (--split/--distractors read a .jsonl or .jsonl.gz of "
                                "question/answers/ctxs records)")
    records = read_multidoc_qa(path)
    try:
        chosen = split_records(records, config.split or "train")  # type: ignore[arg-type]
    except ValueError as e:
        raise TrainError(f"{path}: {e}") from None
    kind: Any = config.distractor_kind
    skipped: list[Any] = []
    out: list[Example] = list(multidoc_examples(chosen, config.distractors or 0, kind, gold_position="random",
                                                seed=config.seed, pool=PassagePool.from_records(records),
                                                skipped=skipped))
    if skipped:
        warnings.warn(f"{path}: {len(skipped)} question(s) skipped: fewer than {config.distractors} answer-free "
                      f"distractors (e.g. {skipped[0].question!r}, answers {list(skipped[0].answers)})", stacklevel=2)
    return out


def prompt_format(config: TrainConfig) -> PromptFormat:
    """The prompt layout a run trains with (``TrainConfig.prompt``)."""
    from .data.retrieval import LITM_FORMAT

    litm = config.prompt == "litm" or (config.prompt == "auto" and (
        config.split is not None or config.distractors is not None))
    return LITM_FORMAT if litm else DEFAULT_FORMAT


# -- model preparation ----------------------------------------------------------------------------------------------


def projection_modules(model: nn.Module, top: int | None = None) -> dict[str, nn.Module]:
    """Full name -> module of every attention projection (q/k/v/o, fused qkv, GPT-2's c_attn/c_proj); with
    ``top``, of the last ``top`` attention layers only.

    These are the direct linear children of each attention module, so per-head norms (Qwen3's q_norm) and any
    attached method module are not included.
    """
    from transformers.pytorch_utils import Conv1D

    names = {id(m): n for n, m in model.named_modules()}
    out: dict[str, nn.Module] = {}
    layers = attention_layers(model)
    for _, attn in layers[-top:] if top else layers:
        for child_name, child in attn.named_children():
            if isinstance(child, nn.Linear | Conv1D):
                out[f"{names[id(attn)]}.{child_name}"] = child
    if not out:
        raise TrainError("found no attention projections (q/k/v/o) in this model")
    return out


def projection_parameters(model: nn.Module, top: int | None = None) -> dict[str, nn.Parameter]:
    """Full parameter name -> parameter of the attention projections (weights and biases), of the last ``top``
    layers only when given."""
    return {f"{mn}.{pn}": p for mn, m in projection_modules(model, top).items() for pn, p in m.named_parameters()}


def attention_parameters(model: nn.Module, *, lm_head: bool = False) -> dict[str, nn.Parameter]:
    """The projection parameters of the layers the model's method patches (every layer's for a stock model),
    plus ``lm_head.weight`` when asked: what kind ``method+attn`` trains beside the method."""
    st = state_of(model)
    patched = {id(a) for a in st.layers.values()} if st is not None else None
    names = {id(m): n for n, m in model.named_modules()}
    keep = None if patched is None else {names[i] for i in patched}
    out = {n: p for n, p in projection_parameters(model).items()
           if keep is None or n.rsplit(".", 2)[0] in keep}
    if lm_head:
        head: Any = getattr(model, "get_output_embeddings", lambda: None)()
        if head is None or not isinstance(getattr(head, "weight", None), nn.Parameter):
            raise TrainError("lm_head: this model has no output embedding to train")
        out.setdefault("lm_head.weight", head.weight)
    return out


def _lora_config(config: TrainConfig, model: nn.Module) -> Any:
    from peft import LoraConfig

    # Full module names: GPT-2's attention c_proj shares its short name with the MLP's c_proj.
    return LoraConfig(
        r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
        target_modules=sorted(projection_modules(model, config.top_layers)), bias="none", task_type="CAUSAL_LM",
    )


def _check_qlora_available() -> None:
    missing = []
    if not torch.cuda.is_available():
        missing.append("a CUDA device")
    if importlib.util.find_spec("bitsandbytes") is None:
        missing.append("the bitsandbytes package")
    if missing:
        raise TrainError(f"--qlora needs {' and '.join(missing)}; use --lora for LoRA over the full-precision model")


def _load_model(config: TrainConfig) -> tuple[nn.Module, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .models import ModelNotFoundError, resolve_model

    try:
        path = resolve_model(config.model, progress=config.progress)
    except ModelNotFoundError as e:
        raise TrainError(str(e)) from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        kwargs: dict[str, Any] = {"dtype": _DTYPES[config.dtype]}
        if config.qlora:
            from transformers import BitsAndBytesConfig

            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
                bnb_4bit_use_double_quant=True,
            )
            kwargs["dtype"] = torch.bfloat16
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as e:
        raise TrainError(f"cannot load model '{config.model}': {e}") from None
    if config.qlora:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model)
    return model, tokenizer


def prepare_model(
    model: nn.Module, config: TrainConfig, lora_config: Any = None, calibration_inputs: Any = None
) -> tuple[nn.Module, nn.Module]:
    """Make exactly the parameters of ``config.kind`` trainable.

    ``calibration_inputs`` (a batch dict) is passed to :func:`attndenoise.apply` for methods whose options need
    sample data (``MethodConfig.needs_calibration``, e.g. DEX's entropy head selection).

    Returns ``(train_model, base)``: what the Trainer trains (a ``PeftModel`` for the LoRA kinds) and the transformers
    model inside it (the one carrying the method, if any).
    """
    kind = config.kind
    if kind == "none":
        for p in model.parameters():
            p.requires_grad_(False)
        for p in projection_parameters(model, config.top_layers).values():
            p.requires_grad_(True)
        return model, model
    if config.lm_head and kind != "method+attn":
        raise ConfigError("--lm-head trains lm_head beside the attention projections; it needs --attention")
    if kind in ("method", "method+attn", "method+lora"):
        cfg = config.method_config()
        assert cfg is not None
        if cfg.uses_lambda_schedule and cfg.anneal_steps > config.steps:
            # The schedule is counted in optimiser steps: a run shorter than T ends with lambda still ramping up
            # (the library default T = 1000 suits long runs, not a 100-step try).
            warnings.warn(
                f"anneal_steps={cfg.anneal_steps} > steps={config.steps}: the lambda schedule will reach "
                f"{config.steps / cfg.anneal_steps:.0%} of its ramp; pass --set anneal_steps=N (N <= steps)",
                stacklevel=2,
            )
        if cfg.needs_calibration:
            if calibration_inputs is None:
                raise ConfigError(f"method '{cfg.name}' with these options needs calibration data; pass "
                                  "calibration_inputs (train() uses its first training examples)")
            apply(model, cfg, calibration_inputs=calibration_inputs)
        else:
            apply(model, cfg)
    if kind == "method":
        return model, model
    if kind == "method+attn":
        for p in attention_parameters(model, lm_head=config.lm_head).values():
            p.requires_grad_(True)
        return model, model
    from peft import get_peft_model

    lora_config = lora_config or _lora_config(config, model)
    method_params = [p for p in model.parameters() if p.requires_grad] if kind == "method+lora" else []
    peft_model = get_peft_model(model, lora_config)
    # peft freezes everything but the LoRA matrices; the method's parameters train beside them (measured with peft
    # 0.21: keeping them trainable works; they are saved separately in the attndenoise format, not by peft).
    for p in method_params:
        p.requires_grad_(True)
    return peft_model, model


def _atomic_write_text(path: Path, text: str) -> None:
    from .io import atomic_write_text

    atomic_write_text(path, text)


def _replace_dir(write: Any, target: Path) -> None:
    """Write a directory under a temporary name, then swap it into place."""
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        write(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _versions() -> dict[str, str]:
    import peft
    import transformers

    from . import __version__

    return {"attndenoise": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__}


# -- resuming -------------------------------------------------------------------------------------------------------


def settings_diff(recorded: dict[str, Any], config: TrainConfig) -> dict[str, dict[str, Any]]:
    """The fields (outside :data:`RESUME_FREE`) whose recorded value differs from ``config``'s, as
    ``{name: {"recorded": old, "now": new}}``; a field missing from an older record counts as its default."""
    defaults = {f.name: (f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default)  # type: ignore[misc]
                for f in dataclasses.fields(TrainConfig)}
    now = jsonable(config.to_dict())
    return {k: {"recorded": recorded.get(k, jsonable(defaults.get(k))), "now": v} for k, v in now.items()
            if k not in RESUME_FREE and recorded.get(k, jsonable(defaults.get(k))) != v}


def describe_diff(diffs: dict[str, dict[str, Any]], where: str = "in the checkpoint") -> str:
    return "; ".join(f"{k}: {d['recorded']!r} {where}, {d['now']!r} now" for k, d in diffs.items())


def _check_resume(config: TrainConfig, last: str) -> list[dict[str, Any]]:
    """Refuse to continue checkpoint ``last`` with other settings than it was trained with (unless
    ``force_resume``); returns the override history to record (earlier forced resumes, then this one's)."""
    path = Path(last) / CHECKPOINT_RECORD_FILE
    if not path.is_file():
        warnings.warn(f"{last} holds no record of its settings (written by an older attndenoise): --resume cannot "
                      "check that they match this run's", stacklevel=3)
        return []
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise TrainError(f"{path}: not valid JSON ({e}); remove that checkpoint to resume from an earlier "
                         "one") from None
    diffs = settings_diff(record.get("config", {}), config)
    history = list(record.get("resume_overrides", []))
    if diffs:
        if not config.force_resume:
            raise TrainError(
                f"{Path(last).parent}: {Path(last).name} was trained with other settings ({describe_diff(diffs)}); "
                "resuming would mix them. Resume with the recorded settings, or pass --force-resume "
                "(force_resume=True) to continue with the new ones (run.json then records the change)"
            )
        history.append({"checkpoint": Path(last).name, "changed": diffs})
    return history


def _finished_run(config: TrainConfig, out: Path, model: nn.Module | None, tokenizer: Any) -> TrainResult:
    """``--resume`` of a finished run: nothing to train and nothing rewritten; its trained model, if the settings are
    the ones it was trained with."""
    try:
        run = read_run(out)
    except AdapterLoadError as e:
        raise TrainError(f"{e}; remove it or choose another --out") from None
    diffs = settings_diff(run.get("config", {}), config)
    if diffs:
        raise TrainError(f"{out} holds a finished run trained with other settings "
                         f"({describe_diff(diffs, 'in run.json')}); a finished run is not continued: choose another "
                         "--out to train with the new settings")
    if model is None:
        model, tokenizer = _load_model(config)
    return TrainResult(out_dir=out, run=run, model=load_trained(model, out),
                       main_process=int(os.environ.get("RANK", "0")) == 0, already_finished=True)


def matched_lora_rank(model: nn.Module, method: str, options: dict[str, Any] | None = None,
                      top: int | None = None) -> int:
    """The LoRA rank whose trainable-parameter count on the attention projections (of the last ``top`` layers, or
    all) is nearest ``method``'s own with ``options`` on the same layers: the baseline ``lora~<method>`` of the
    method-alone protocol. ``model`` is not changed (a copy is patched)."""
    probe = copy.deepcopy(model).requires_grad_(False)
    layers = {"layers": list(range(-top, 0))} if top else {}
    apply(probe, registry.config_for(method, **{**(options or {}), **layers}))
    count = sum(p.numel() for p in probe.parameters() if p.requires_grad)
    per_rank = sum(int(w.shape[0]) + int(w.shape[1])
                   for w in (cast(torch.Tensor, m.weight) for m in projection_modules(model, top).values()))
    return max(1, round(count / per_rank))


# -- train ----------------------------------------------------------------------------------------------------------


def train(
    config: TrainConfig | None = None,
    *,
    model: nn.Module | str | os.PathLike[str] | None = None,
    tokenizer: Any = None,
    callbacks: Sequence[TrainerCallback] = (),
    **overrides: Any,
) -> TrainResult:
    """Train ``config.kind`` on ``config.data`` and write the run directory ``config.out``.

    ``model``/``tokenizer`` objects replace loading from ``config.model`` (which is then only recorded); a string
    ``model`` is the path or hub id (``config.model``).
    Keyword ``overrides`` are ``TrainConfig`` fields (``train(model="path", method="daa", steps=10)``).
    Runs unchanged under ``torchrun`` (each process calls this; only the main process writes the outputs).
    """
    # transformers' Trainer (and peft and datasets with it) takes seconds to import: only a training run pays for it.
    from transformers import PrinterCallback, set_seed
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

    from .hf_trainer import AtomicTrainer, LambdaCallback, LambdaHistory

    config, net, records = _resolve_inputs(config, model, tokenizer, overrides)
    out = Path(config.out)
    out_existed = out.exists()
    last = get_last_checkpoint(str(out)) if out.is_dir() else None
    if out.is_dir() and not config.resume and (last is not None or (out / RUN_FILE).exists()):
        raise TrainError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
    if config.resume and (out / RUN_FILE).is_file():
        return _finished_run(config, out, net, tokenizer)
    resume_overrides = _check_resume(config, last) if config.resume and last is not None else []

    examples = load_training_examples(config, records)  # data errors surface before the model is loaded
    if net is None:
        net, tokenizer = _load_model(config)
    base_path = config.model or str(getattr(getattr(net, "config", None), "_name_or_path", "") or "")

    set_seed(config.seed)  # LoRA initialisation; identical on every process
    report, features, pad_id = _encode(config, examples, tokenizer)

    lora_config = _lora_config(config, net) if config.kind in ("lora", "method+lora") else None
    # A few training examples for options resolved from data (e.g. DEX's entropy head selection), built only when
    # the method needs them; the batch is padded, and the mask keeps padding out of the statistics.
    method_cfg = config.method_config()
    calib = None
    if method_cfg is not None and method_cfg.needs_calibration:
        calib = {k: v for k, v in collate(features[:8], pad_id).items() if k != "labels"}
    _check_top_layers(config, net)
    train_model, base = prepare_model(net, config, lora_config, calibration_inputs=calib)
    signature = base_signature(base)
    args = _training_arguments(config, out)
    optimizers: Any = (None, None)
    if config.method_lr is not None:
        optimizers = (_two_rate_optimizer(config, args, train_model, base), None)
    global_batch = config.batch_size * config.grad_accum * args.world_size
    order = training_order(len(features), config.steps * global_batch, config.seed)
    frozen, hidden = _frozen_prefix(config, base, features, signature, order)
    if frozen is not None:
        features = [{**f, "frozen_index": [i]} for i, f in enumerate(features)]
    dataset = _OrderedDataset(features, order)
    trainer = AtomicTrainer(
        model=train_model, args=args, train_dataset=dataset,
        data_collator=(lambda batch: collate(batch, pad_id)) if frozen is None else _HiddenCollator(hidden, pad_id),
        frozen=frozen, optimizers=optimizers,
        callbacks=[LambdaCallback(), LambdaHistory(), *callbacks],
        method_model=base if config.kind == "method+lora" else None,
        trainable_only=config.kind in ("method", "method+attn", "none"),
        record={"config": jsonable(config.to_dict()), "resume_overrides": resume_overrides},
    )
    if not config.progress:
        # Without the progress bar the Trainer prints every log dict instead; progress=False means quiet (the
        # history still goes to run.json).
        trainer.remove_callback(PrinterCallback)
    if args.should_save:
        for stale in out.glob(f".tmp-{PREFIX_CHECKPOINT_DIR}-*"):  # left by a run killed mid-checkpoint
            shutil.rmtree(stale, ignore_errors=True)
    resume_from = get_last_checkpoint(str(out)) if config.resume and out.is_dir() else None
    if resume_from is not None:
        trainer.restore_method(resume_from)
    start = time.perf_counter()
    try:
        trainer.train(resume_from_checkpoint=resume_from)
    except BaseException:
        # A run that stops before its first checkpoint (a non-finite loss, Ctrl-C) leaves no empty --out behind.
        if not out_existed and args.should_save and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        raise
    seconds = time.perf_counter() - start

    run = _run_record(config, trainer, args, base, train_model, lora_config, base_path, signature,
                      examples=len(features), skipped=len(report.skipped), seconds=seconds,
                      resume_from=resume_from, resume_overrides=resume_overrides)
    if args.should_save:
        out.mkdir(parents=True, exist_ok=True)
        _write_outputs(out, config.kind, train_model, base, lm_head=config.lm_head, top=config.top_layers)
        _atomic_write_text(out / RUN_FILE, json.dumps(run, indent=2, default=str) + "\n")
    trainer.accelerator.wait_for_everyone()
    return TrainResult(out_dir=out, run=run, model=train_model, main_process=trainer.is_world_process_zero())


def _resolve_inputs(config: TrainConfig | None, model: Any, tokenizer: Any,
                    overrides: dict[str, Any]) -> tuple[TrainConfig, nn.Module | None, Sequence[Any] | None]:
    """``train``'s arguments checked and merged: the config with ``overrides`` applied, the model object (``None``
    when it is to be loaded from ``config.model``) and in-memory training records (``None`` for a data file)."""
    if isinstance(model, str | os.PathLike):
        overrides["model"], model = str(model), None
    # In-memory data (a datasets.Dataset, a list of records): parsed from the object, recorded by count and hash.
    records: Sequence[Any] | None = None
    data = overrides.get("data", config.data if config is not None else None)
    if isinstance(data, os.PathLike):
        overrides["data"] = str(data)
    elif data is not None and not isinstance(data, str):
        records = list(data)
        overrides["data"] = in_memory_label(records)
    config = dataclasses.replace(config, **overrides) if config is not None else TrainConfig(**overrides)
    if config.qlora:
        _check_qlora_available()  # before anything is loaded
        if model is not None:
            raise TrainError("--qlora loads the base in 4 bits itself: pass the model path, not a model object")
    if model is None and not config.model:
        raise ConfigError("model: give a model path or hub id (or pass a model object)")
    if (model is None) != (tokenizer is None):
        raise ConfigError("pass both model and tokenizer objects, or neither")
    return config, model, records


def _encode(config: TrainConfig, examples: Sequence[Any], tokenizer: Any) -> tuple[Any, list[dict[str, Any]], int]:
    """The training examples encoded (those longer than ``max_length`` skipped), their features and the pad id."""
    report = encode_examples(examples, tokenizer, config.max_length, fmt=prompt_format(config), on_too_long="skip")
    if not report.encoded:
        raise TrainError(f"no example fits in max_length={config.max_length}; raise --max-length")
    features = [e.features() for e in report.encoded]
    warn_unknown_tokens(tokenizer, [f["input_ids"] for f in features], f"training data {config.data}")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise TrainError("the tokenizer has neither a pad nor an EOS token to pad batches with")
    return report, features, int(pad_id)


def _training_arguments(config: TrainConfig, out: Path) -> Any:
    """The Trainer's arguments for ``config`` (sequential sampling: the order is :func:`training_order`'s)."""
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum, max_steps=config.steps, learning_rate=config.learning_rate,
        weight_decay=config.weight_decay, warmup_steps=config.warmup_steps, lr_scheduler_type=config.lr_scheduler,
        logging_steps=config.logging_steps, logging_first_step=True, save_strategy="steps",
        save_steps=config.save_steps, save_total_limit=config.save_total_limit, seed=config.seed,
        data_seed=config.seed, report_to=[], use_cpu=not torch.cuda.is_available(),
        disable_tqdm=not config.progress, remove_unused_columns=False, dataloader_num_workers=0,
        train_sampling_strategy="sequential",
        # Some methods leave parameters unused in some layers (e.g. layer selection); DDP must be told.
        ddp_find_unused_parameters=config.kind != "none",
    )


def _run_record(config: TrainConfig, trainer: Any, args: Any, base: nn.Module, train_model: nn.Module,
                lora_config: Any, base_path: str, signature: dict[str, Any], *, examples: int, skipped: int,
                seconds: float, resume_from: str | None, resume_overrides: list[dict[str, Any]]) -> dict[str, Any]:
    """The content of ``run.json``: what was trained, on what, how long, and its loss and lambda history."""
    run = {
        "format_version": RUN_FORMAT,
        "kind": config.kind,
        "method": config.method,
        "method_config": (state_of(base).config.to_dict() if state_of(base) is not None else None),  # type: ignore[union-attr]
        "lora": lora_config.to_dict() if lora_config is not None else None,
        "config": config.to_dict(),
        "base_model": base_path,
        "base": signature,
        "steps": trainer.state.global_step,
        "world_size": args.world_size,
        "global_batch": config.batch_size * config.grad_accum * args.world_size,
        "examples": examples,
        "trainable_parameters": sum(p.numel() for p in train_model.parameters() if p.requires_grad),
        "skipped_too_long": skipped,
        "loss_history": [{"step": h["step"], "loss": h["loss"]} for h in trainer.state.log_history if "loss" in h],
        "lambda_history": [
            {"step": h["step"], **{k: v for k, v in h.items() if k.startswith("lambda/")}}
            for h in trainer.state.log_history if any(k.startswith("lambda/") for k in h)
        ],
        "final_lambdas": current_lambdas(base),
        "seconds": round(seconds, 3),
        "resumed_from": resume_from,
        "resume_overrides": resume_overrides,
        "versions": _versions(),
    }
    run["lora"] = jsonable(run["lora"])
    return run


def _two_rate_optimizer(config: TrainConfig, args: Any, train_model: nn.Module, base: nn.Module) -> Any:
    """The optimizer the Trainer would build (its class and keyword arguments for ``args``: AdamW, fused where
    torch has it) with the method's parameters at ``method_lr`` and every other trainable parameter at
    ``learning_rate``; the Trainer's schedule scales both alike (``weight_decay``, 0 by default, then applies to
    every parameter of both groups)."""
    from transformers import Trainer

    from .patch import method_modules

    mine = {id(p) for m in method_modules(base).values() for p in m.parameters() if p.requires_grad}
    rest = [p for p in train_model.parameters() if p.requires_grad and id(p) not in mine]
    method = [p for p in train_model.parameters() if p.requires_grad and id(p) in mine]
    groups: list[dict[str, Any]] = [{"params": rest, "lr": config.learning_rate},
                                    {"params": method, "lr": config.method_lr}]
    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, train_model)  # type: ignore[arg-type]
    return cls([g for g in groups if g["params"]], **{**kwargs, "lr": config.learning_rate,
                                                      "weight_decay": config.weight_decay})


class _HiddenCollator:
    """Pads a batch (right padding) and adds the captured hidden states of its examples as ``frozen_hidden``."""

    def __init__(self, hidden: list[torch.Tensor], pad_id: int) -> None:
        self.hidden, self.pad_id = hidden, pad_id

    def __call__(self, batch: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        out = collate([{k: v for k, v in f.items() if k != "frozen_index"} for f in batch], self.pad_id)
        rows = [self.hidden[f["frozen_index"][0]] for f in batch]
        h = rows[0].new_zeros(len(rows), out["input_ids"].shape[1], rows[0].shape[-1])
        for i, r in enumerate(rows):
            h[i, : r.shape[0]] = r
        out["frozen_hidden"] = h
        return out


def _check_top_layers(config: TrainConfig, model: nn.Module) -> None:
    """``top_layers`` against the stock model, before anything is patched or made trainable: the range, a method
    whose ``layers`` reach below the split, and ``lm_head`` tied to the (frozen) input embeddings."""
    if config.top_layers is None:
        return
    from .frozen import FrozenPrefix, FrozenPrefixError, decoder_layers

    try:
        split = FrozenPrefix.top(model, config.top_layers)
    except FrozenPrefixError as e:
        raise TrainError(str(e)) from None
    cfg = config.method_config()
    if cfg is not None:
        chosen = cfg.select_layers(len(decoder_layers(model)))
        if min(chosen) < split.first:
            raise TrainError(f"top_layers={config.top_layers} freezes the layers below {split.first}, but the method "
                             f"patches layer {min(chosen)}; drop the method's 'layers' option or raise top_layers")
    if config.lm_head:
        head: Any = getattr(model, "get_output_embeddings", lambda: None)()
        emb: Any = getattr(model, "get_input_embeddings", lambda: None)()
        if head is not None and emb is not None and head.weight is emb.weight:
            raise TrainError("--lm-head with --top-layers: this model ties lm_head to its input embeddings, which "
                             "the frozen layers read; drop --lm-head or --top-layers")


def _frozen_prefix(
    config: TrainConfig, base: nn.Module, features: list[dict[str, list[int]]], signature: dict[str, Any],
    used: Sequence[int],
) -> tuple[Any, list[torch.Tensor]]:
    """With ``top_layers``: the split of ``base`` and the hidden states entering the top layers of the examples
    the run reads (``used``), read from the cache folder or captured once (one no-grad forward of the lower layers
    per example; examples the run never reads are not captured)."""
    if config.top_layers is None:
        return None, []
    from .frozen import FrozenPrefix, FrozenPrefixError, cached_hidden

    try:
        split = FrozenPrefix.top(base, config.top_layers)
        split.check_frozen()
    except FrozenPrefixError as e:
        raise TrainError(str(e)) from None
    hidden = cached_hidden(split, [features[i]["input_ids"] for i in sorted(set(used))], signature,
                           progress=config.progress)
    by_index = dict(zip(sorted(set(used)), hidden, strict=True))
    out: list[torch.Tensor] = [by_index.get(i, torch.empty(0)) for i in range(len(features))]
    return split, out


def jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=lambda v: sorted(v) if isinstance(v, set) else str(v)))


def _write_outputs(out: Path, kind: str, train_model: nn.Module, base: nn.Module, lm_head: bool = False,
                   top: int | None = None) -> None:
    if kind in ("method", "method+attn", "method+lora"):
        save(base, out)
    if kind in ("lora", "method+lora"):
        _replace_dir(lambda d: train_model.save_pretrained(str(d)), out / LORA_DIR)  # type: ignore[operator]
    if kind in ("none", "method+attn"):
        params = projection_parameters(base, top) if kind == "none" else attention_parameters(base, lm_head=lm_head)
        tensors = {n: p.detach().cpu().contiguous() for n, p in params.items()}
        from .io import atomic_write

        atomic_write(out / PROJECTIONS_FILE, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))


# -- loading --------------------------------------------------------------------------------------------------------


def read_run(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``run.json`` of a finished run, checked for the fields :func:`load_trained` needs."""
    path = Path(run_dir) / RUN_FILE
    if not path.is_file():
        raise AdapterLoadError(f"{path}: no run.json here (not a finished `attndenoise train` output directory)")
    try:
        run = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise AdapterLoadError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(run, dict) or run.get("format_version") != RUN_FORMAT:
        raise AdapterLoadError(f"{path}: unknown run format (expected format_version {RUN_FORMAT})")
    if run.get("kind") not in KINDS:
        raise AdapterLoadError(f"{path}: kind {run.get('kind')!r} is not one of {', '.join(KINDS)}")
    if not isinstance(run.get("base"), dict):
        raise AdapterLoadError(f"{path}: missing the 'base' section")
    return run


def load_trained(model: nn.Module, run_dir: str | os.PathLike[str]) -> nn.Module:
    """The trained model of the run in ``run_dir``, built on ``model`` (a stock model of the run's base).

    * ``method``: ``model`` with the method adapter applied (as :func:`attndenoise.load`).
    * ``none``: ``model`` with the trained projection tensors copied in.
    * ``method+attn``: the method adapter applied, then the patched layers' trained projections copied in.
    * ``lora`` / ``method+lora``: a ``peft.PeftModel`` wrapping ``model`` (with the method applied first for
      ``method+lora``), exactly as trained; ``.get_base_model()`` is the transformers model carrying the method.
      It is not merged; methods that read a projection (DiffQ/K/V) read it with the LoRA, as in training, so
      ``merge_and_unload()`` leaves the outputs unchanged.

    Strict: another base architecture, a missing or extra tensor, or a wrong shape raises
    :class:`attndenoise.AdapterLoadError` and leaves ``model`` as it was.
    """
    d = Path(run_dir)
    run = read_run(d)
    kind = run["kind"]
    if state_of(model) is not None:
        raise AdapterLoadError("the model already carries an attndenoise method; pass a stock model")
    check_base_signature(model, run["base"], f"{d}: the run was trained on another base architecture", "run")
    if kind == "none":
        top = run.get("config", {}).get("top_layers")
        _load_projections(model, d / PROJECTIONS_FILE, projection_parameters(model, top))
        return model
    if kind in ("method", "method+attn", "method+lora"):
        load(model, d)
    if kind == "method+attn":
        # After the method: it names the patched layers, whose projections the file holds (strictly).
        try:
            lm_head = bool(run.get("config", {}).get("lm_head", False))
            _load_projections(model, d / PROJECTIONS_FILE, attention_parameters(model, lm_head=lm_head))
        except Exception:
            remove(model)
            raise
    if kind in ("method", "method+attn"):
        return model
    try:
        return _load_lora(model, d / LORA_DIR)
    except Exception:
        if state_of(model) is not None:
            remove(model)
        raise


def _load_projections(model: nn.Module, path: Path, params: dict[str, nn.Parameter]) -> None:
    if not path.is_file():
        raise AdapterLoadError(f"{path}: missing the trained projection tensors")
    tensors = read_tensors(path)
    copy_tensors_strict(params, tensors, path, "not projections of this model")


def _load_lora(model: nn.Module, lora_dir: Path) -> nn.Module:
    from peft import PeftModel, get_peft_model_state_dict

    weights = lora_dir / "adapter_model.safetensors"
    if not (lora_dir / "adapter_config.json").is_file() or not weights.is_file():
        raise AdapterLoadError(f"{lora_dir}: missing the peft adapter (adapter_config.json, adapter_model.safetensors)")
    saved = read_tensors(weights)
    peft_model = PeftModel.from_pretrained(model, str(lora_dir), is_trainable=False)
    # peft only warns about keys it could not place: check both directions ourselves.
    have = get_peft_model_state_dict(peft_model)
    missing, extra = sorted(set(have) - set(saved)), sorted(set(saved) - set(have))
    if missing or extra:
        peft_model.unload()
        raise AdapterLoadError(f"{weights}: LoRA tensors do not match the model (missing: {missing or 'none'}; "
                               f"unexpected: {extra or 'none'})")
    return peft_model


__all__ = [
    "TrainConfig", "TrainResult", "TrainError", "train", "load_trained", "read_run", "known_methods", "KINDS",
    "projection_parameters", "training_order",
]
