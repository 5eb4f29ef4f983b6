"""Load a checkpoint saved by the OpAmp authors' code (github.com/wuhy68/OpampAdapter) as a stock model + our OpAmp.

What their code saves (``merge_lora.py``: QLoRA merged into the base, then ``save_pretrained``) is a directory with
``config.json`` (``model_type`` ``"opampllama"`` or ``"opampqwen2"``, the base model's fields plus ``adapter_dim``,
``adapter_rank``, ``adapter_scaling``, ``adapter_lambda``, ``adapter_layer``) and safetensors weights (one file or
shards with ``model.safetensors.index.json``): every base tensor under its stock Llama / Qwen2 name, plus, for each
adapted layer ``i`` (``i % adapter_layer == 0``),
``model.layers.{i}.self_attn.{q1,k1,q2,k2}_adapter.adapter_{down,up}.weight``.

The mapping to :class:`~attndenoise.methods.opamp.OpAmpConfig` (the parameterisation is the same, only renamed):

* their ``OpampAdapterMLP`` ``x + c * adapter_up(gelu(adapter_down(dropout(x))))`` is our
  :class:`~attndenoise.methods.opamp.Adapter` with the same submodule names; ``adapter_down.weight`` (d2, size) is
  ``W1`` and ``adapter_up.weight`` (size, d2) is ``W2``, both copied as they are;
* ``adapter_dim`` -> ``adapter_dim`` (checked against the tensor shapes); ``adapter_scaling`` -> ``adapter_scaling``;
  ``adapter_lambda`` (their ``adapter_lambda_d``; ``adapter_lambda_c`` is fixed at 1) -> ``cmrr``;
* ``adapter_layer = n`` (their ``layer_idx % n == 0``) -> ``layers="every:n"`` (``"all"`` for 1);
* their hard-coded dropout ``p=0.1`` -> ``adapter_dropout=0.1``; ``adapter_rank`` is ignored (their config stores it,
  nothing reads it);
* Llama: ``E_k`` on the h_kv key heads -> ``key_adapters="kv_heads"``; Qwen2: ``repeat_kv`` first, then ``E_k`` on
  the h repeated heads -> ``key_adapters="repeated"`` (``"kv_heads"`` when h == h_kv: the same function).

Fields missing from ``config.json`` take their configuration classes' defaults (``adapter_dim=64``,
``adapter_scaling=0.25``, ``adapter_lambda=10``, ``adapter_layer=1``), because that is what their code would run
with. Unlike their evaluator (``load_state_dict(..., strict=False)``, which leaves adapters it does not find at
their random initialisation), loading here is strict: a missing or unexpected tensor, or one of the wrong shape,
raises :class:`OpAmpCheckpointError` naming it.

Only safetensors checkpoints are read (no pickle); convert ``pytorch_model.bin`` / ``na_model.bin`` first.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel, Qwen2Config, Qwen2ForCausalLM
from transformers.utils import logging as hf_logging

from ..io import AdapterLoadError
from ..patch import apply, method_modules
from .opamp import OpAmpConfig

#: ``model_type`` in their config.json (and the stock names, for configs edited by hand) -> our family
MODEL_TYPES = {"opampllama": "llama", "llama": "llama", "opampqwen2": "qwen2", "qwen2": "qwen2"}
_CLASSES: dict[str, tuple[type[Any], type[PreTrainedModel]]] = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
}
#: their configuration classes' defaults (OpampLlamaConfig / OpampQwen2Config)
AUTHOR_DEFAULTS: dict[str, Any] = {"adapter_dim": 64, "adapter_scaling": 0.25, "adapter_lambda": 10, "adapter_layer": 1}
#: their config fields that are not part of the stock config
_ADAPTER_FIELDS = ("adapter_dim", "adapter_rank", "adapter_scaling", "adapter_lambda", "adapter_layer")
_DROP_FIELDS = ("model_type", "architectures", "auto_map", "_name_or_path", "transformers_version")
ADAPTERS = ("q1", "k1", "q2", "k2")
_ADAPTER_KEY = re.compile(
    r"^model\.layers\.(\d+)\.self_attn\.(q1|k1|q2|k2)_adapter\.(adapter_down|adapter_up)\.weight$"
)
#: the dropout their OpampAdapterMLP hard-codes
AUTHOR_DROPOUT = 0.1


class OpAmpCheckpointError(AdapterLoadError):
    """The directory is not a complete checkpoint of the authors' OpAmp Llama / Qwen2 code."""


def adapter_key(layer: int, which: str, part: str) -> str:
    """Their name of one adapter tensor (``which`` in q1/k1/q2/k2, ``part`` = ``adapter_down``/``adapter_up``)."""
    return f"model.layers.{layer}.self_attn.{which}_adapter.{part}.weight"


def _weight_files(d: Path) -> list[Path]:
    index = d / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise OpAmpCheckpointError(f"{index}: not a safetensors index ({e})") from None
        files = sorted({d / f for f in weight_map.values()})
        absent = [str(f) for f in files if not f.is_file()]
        if absent:
            raise OpAmpCheckpointError(f"{index}: shard(s) {', '.join(absent)} not found")
        return files
    single = d / "model.safetensors"
    if single.is_file():
        return [single]
    pickles = sorted(p.name for p in d.glob("*.bin"))
    hint = f" (found {', '.join(pickles)}: pickle files are not read; save them as safetensors)" if pickles else ""
    raise OpAmpCheckpointError(f"{d}: no model.safetensors or model.safetensors.index.json{hint}")


def _tensor_names(files: list[Path]) -> dict[str, Path]:
    names: dict[str, Path] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as h:
            for k in h.keys():  # noqa: SIM118 (safe_open handles are not mappings)
                names[k] = f
    return names


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """transformers reports the adapter tensors as UNEXPECTED ("can be ignored"): we check them ourselves."""
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def read_checkpoint_config(path: str | os.PathLike[str]) -> tuple[str, Any, dict[str, Any]]:
    """``(family, stock transformers config, their adapter settings with their defaults filled in)``."""
    d = Path(path)
    cfg_path = d / "config.json"
    if not cfg_path.is_file():
        raise OpAmpCheckpointError(f"{d}: no config.json (expected a directory saved by the OpAmp authors' code)")
    try:
        raw = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise OpAmpCheckpointError(f"{cfg_path}: not valid JSON ({e})") from None
    model_type = raw.get("model_type")
    family = MODEL_TYPES.get(model_type)  # type: ignore[arg-type]
    if family is None:
        raise OpAmpCheckpointError(
            f"{cfg_path}: model_type {model_type!r} is not an OpAmp checkpoint this loader knows; "
            f"accepted: {', '.join(repr(k) for k in MODEL_TYPES)}"
        )
    settings = {k: raw.get(k, v) for k, v in AUTHOR_DEFAULTS.items()}
    n = settings["adapter_layer"]
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise OpAmpCheckpointError(f"{cfg_path}: adapter_layer={n!r} must be an integer >= 1")
    fields = {k: v for k, v in raw.items() if k not in _ADAPTER_FIELDS + _DROP_FIELDS}
    config_cls, _ = _CLASSES[family]
    config = config_cls(**fields)
    if family == "qwen2":
        # their Qwen2 attention always uses hidden_size // num_attention_heads, whatever config.json says
        head_dim = config.hidden_size // config.num_attention_heads
        if getattr(config, "head_dim", None) not in (None, head_dim):
            raise OpAmpCheckpointError(
                f"{cfg_path}: head_dim={config.head_dim} but the authors' Qwen2 code uses hidden_size // "
                f"num_attention_heads = {head_dim}; this checkpoint does not describe one model"
            )
    return family, config, settings


def adapter_shapes(family: str, config: Any, settings: dict[str, Any]) -> dict[tuple[str, str], tuple[int, int]]:
    """Shape of each adapter tensor in the authors' code, from their config: (which, part) -> (out, in)."""
    h = config.num_attention_heads
    hkv = getattr(config, "num_key_value_heads", None) or h
    if family == "qwen2":
        head_dim = config.hidden_size // h
        k_heads = h  # keys repeated to the query heads before their adapters
    else:
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // h
        k_heads = hkv
    d2 = int(settings["adapter_dim"])
    out = {}
    for which in ADAPTERS:
        size = (h if which.startswith("q") else k_heads) * head_dim
        out[(which, "adapter_down")] = (d2, size)
        out[(which, "adapter_up")] = (size, d2)
    return out


def opamp_config_for(family: str, config: Any, settings: dict[str, Any], **overrides: Any) -> OpAmpConfig:
    """The :class:`OpAmpConfig` that computes what their code computes with these settings (module table)."""
    n = int(settings["adapter_layer"])
    h = config.num_attention_heads
    hkv = getattr(config, "num_key_value_heads", None) or h
    fields: dict[str, Any] = dict(
        layers="all" if n == 1 else f"every:{n}",
        adapter_dim=settings["adapter_dim"],
        adapter_scaling=float(settings["adapter_scaling"]),
        adapter_dropout=AUTHOR_DROPOUT,
        cmrr=float(settings["adapter_lambda"]),
        key_adapters="repeated" if family == "qwen2" and hkv != h else "kv_heads",
    )
    fields.update(overrides)
    return OpAmpConfig(**fields)


def load_opamp_checkpoint(
    path: str | os.PathLike[str], *, cache_adapted_keys: bool = True, **from_pretrained_kwargs: Any
) -> PreTrainedModel:
    """A stock ``LlamaForCausalLM`` / ``Qwen2ForCausalLM`` with our OpAmp applied, computing what the authors'
    ``modeling_opampllama.py`` / ``modeling_opampqwen.py`` compute for the checkpoint in ``path`` (docs/methods.md,
    section OpAmp).

    ``from_pretrained_kwargs`` go to transformers' ``from_pretrained`` (``dtype``, ``device_map``, ...; not
    ``config``). ``cache_adapted_keys`` is the benchmark-only switch of :class:`OpAmpConfig`. The result is an
    ordinary patched model: :func:`attndenoise.save` writes it as an attndenoise adapter, :func:`attndenoise.remove`
    gives back the base model (their merged LoRA included).

    Raises :class:`OpAmpCheckpointError` (an :class:`~attndenoise.AdapterLoadError`) naming every missing,
    unexpected or mis-shaped tensor; nothing is left at a random initialisation.
    """
    if "config" in from_pretrained_kwargs:
        raise TypeError("load_opamp_checkpoint reads the config from the checkpoint; do not pass config=")
    d = Path(path)
    family, config, settings = read_checkpoint_config(d)
    names = _tensor_names(_weight_files(d))

    expected = _check_adapter_tensors(d, family, config, settings, names)
    model = _load_base_strict(d, family, config, set(expected), from_pretrained_kwargs)
    apply(model, opamp_config_for(family, config, settings, cache_adapted_keys=cache_adapted_keys))
    _copy_adapters(model, expected, names)
    return model


def _expected_adapter_keys(config: Any, settings: dict[str, Any]) -> set[str]:
    """The adapter tensors the authors' code writes: both adapters of every ``adapter_layer``-th layer."""
    n = int(settings["adapter_layer"])
    return {adapter_key(i, w, part) for i in range(0, config.num_hidden_layers, n) for w in ADAPTERS
            for part in ("adapter_down", "adapter_up")}


def _check_adapter_tensors(d: Path, family: str, config: Any, settings: dict[str, Any],
                           names: dict[str, Path]) -> set[str]:
    """The expected adapter tensor names, after checking that the files hold exactly those, each of the shape
    ``config.json`` implies (read from the safetensors headers: nothing is loaded yet)."""
    expected = _expected_adapter_keys(config, settings)
    n = int(settings["adapter_layer"])
    found = {k for k in names if _ADAPTER_KEY.match(k)}
    problems = []
    if expected - found:
        problems.append(f"missing adapter tensor(s) {', '.join(sorted(expected - found))}")
    if found - expected:
        problems.append(
            f"unexpected adapter tensor(s) {', '.join(sorted(found - expected))} (adapter_layer={n} adapts layers "
            f"0, {n}, ... only)"
        )
    if not problems:
        shapes = adapter_shapes(family, config, settings)
        for k in sorted(expected):
            with safe_open(str(names[k]), framework="pt") as h:
                got = tuple(h.get_slice(k).get_shape())
            m = _ADAPTER_KEY.match(k)
            assert m is not None  # k was selected by this pattern
            want = shapes[(m.group(2), m.group(3))]
            if got != want:
                problems.append(f"tensor {k} has shape {got}, config.json implies {want}")
        if any("has shape" in p for p in problems):
            problems.append(
                f"(adapter_dim={settings['adapter_dim']}, {config.num_attention_heads} heads, "
                f"{getattr(config, 'num_key_value_heads', None)} key/value heads)"
            )
    if problems:
        raise OpAmpCheckpointError(f"{d}: " + "; ".join(problems))
    return expected


def _load_base_strict(d: Path, family: str, config: Any, adapters: set[str],
                      from_pretrained_kwargs: dict[str, Any]) -> Any:
    """The stock model of ``family`` from the checkpoint's weights; every tensor but the ``adapters`` must be one
    of its own and every one of its own must be there."""
    _, model_cls = _CLASSES[family]
    with _quiet_transformers():
        loaded: Any = model_cls.from_pretrained(d, config=config, output_loading_info=True, **from_pretrained_kwargs)
    model, info = loaded
    base_missing = sorted(info.get("missing_keys", ()))
    base_extra = sorted(set(info.get("unexpected_keys", ())) - adapters)
    mismatched = sorted(str(m) for m in info.get("mismatched_keys", ()))
    errors = [str(e) for e in info.get("error_msgs", ())]
    if base_missing or base_extra or mismatched or errors:
        parts = []
        if base_missing:
            parts.append(f"missing tensor(s) {', '.join(base_missing)}")
        if base_extra:
            parts.append(f"unexpected tensor(s) {', '.join(base_extra)} (not part of {model_cls.__name__} nor OpAmp)")
        if mismatched:
            parts.append(f"mis-shaped tensor(s) {', '.join(mismatched)}")
        parts.extend(errors)
        raise OpAmpCheckpointError(f"{d}: " + "; ".join(parts))
    return model


def _copy_adapters(model: nn.Module, expected: set[str], names: dict[str, Path]) -> None:
    """Copy the checkpoint's adapter tensors into the OpAmp modules just applied, file by file."""
    targets = {
        adapter_key(i, w, part): getattr(getattr(m, f"{w}_adapter"), part).weight
        for i, m in method_modules(model).items()
        for w in ADAPTERS
        for part in ("adapter_down", "adapter_up")
    }
    assert set(targets) == expected  # the same layer rule on both sides
    by_file: dict[Path, list[str]] = {}
    for k in sorted(targets):
        by_file.setdefault(names[k], []).append(k)
    with torch.no_grad():
        for f, keys in by_file.items():
            with safe_open(str(f), framework="pt") as h:
                for k in keys:
                    p = targets[k]
                    p.copy_(h.get_tensor(k).to(device=p.device, dtype=p.dtype))


__all__ = ["load_opamp_checkpoint", "OpAmpCheckpointError", "read_checkpoint_config", "opamp_config_for"]
