"""Adapter files: ``adapter_config.json`` + ``adapter_model.safetensors``, nothing else, never pickle.

Loading is strict: another base architecture, or a missing, extra or mis-shaped tensor, raises
:class:`AdapterLoadError` naming what is wrong, and leaves the model as it was.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from . import registry
from .families import attention_layers, family_of, geometry
from .patch import apply, method_modules, remove, require_state

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
FORMAT_VERSION = 1


class AdapterLoadError(ValueError):
    """The adapter does not fit this model."""


def base_signature(model: nn.Module) -> dict[str, Any]:
    """What an adapter must agree with: family and attention geometry of the base model."""
    layers = attention_layers(model)
    attn = layers[0][1]
    g = geometry(attn)
    fam = family_of(attn)
    return {
        "family": fam.name if fam else None,
        "model_type": getattr(model.config, "model_type", None),
        "num_layers": len(layers),
        "hidden_size": g.hidden_size,
        "num_heads": g.num_heads,
        "num_kv_heads": g.num_kv_heads,
        "head_dim": g.head_dim,
    }


def _atomic_write(path: Path, write: Any) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """All method tensors of a patched model (parameters and state buffers such as the schedule step)."""
    out = {}
    for i, m in method_modules(model).items():
        for k, v in m.state_dict().items():
            out[f"layers.{i}.{k}"] = v.detach().contiguous().clone()
    return out


def save(model: nn.Module, directory: str | os.PathLike[str]) -> Path:
    """Write the method's configuration and tensors to ``directory`` (atomic per file)."""
    st = require_state(model)
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    meta = {
        "format_version": FORMAT_VERSION,
        "config": st.config.to_dict(),
        "base": base_signature(model),
    }
    tensors = {k: v.cpu() for k, v in adapter_tensors(model).items()}
    _atomic_write(d / WEIGHTS_NAME, lambda p: save_file(tensors, p, metadata={"format": "pt"}))
    _atomic_write(d / CONFIG_NAME, lambda p: Path(p).write_text(json.dumps(meta, indent=2) + "\n"))
    return d


def read_config(directory: str | os.PathLike[str]) -> dict[str, Any]:
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise AdapterLoadError(f"{path}: no adapter config here (expected {CONFIG_NAME} and {WEIGHTS_NAME})")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise AdapterLoadError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(meta, dict) or "config" not in meta or "base" not in meta:
        raise AdapterLoadError(f"{path}: missing 'config' or 'base' section")
    return meta


def load(model: nn.Module, directory: str | os.PathLike[str]) -> nn.Module:
    """Apply the adapter saved in ``directory`` to a stock ``model`` of the same base; returns the model."""
    d = Path(directory)
    meta = read_config(d)
    expected, actual = meta["base"], base_signature(model)
    diffs = [f"{k}: adapter {expected.get(k)!r} vs model {actual[k]!r}" for k in actual if expected.get(k) != actual[k]]
    if diffs:
        raise AdapterLoadError(f"{d}: adapter was made for another base architecture ({'; '.join(diffs)})")
    cfg_data = dict(meta["config"])
    config = registry.config_for(cfg_data.pop("method"), **cfg_data)
    wpath = d / WEIGHTS_NAME
    if not wpath.is_file():
        raise AdapterLoadError(f"{wpath}: missing adapter weights")
    tensors = load_file(str(wpath))
    apply(model, config)
    try:
        _copy_strict(model, tensors, wpath)
    except Exception:
        remove(model)
        raise
    return model


def _copy_strict(model: nn.Module, tensors: dict[str, torch.Tensor], source: Path) -> None:
    targets: dict[str, torch.Tensor] = {}
    for i, m in method_modules(model).items():
        for k, v in m.state_dict(keep_vars=True).items():
            targets[f"layers.{i}.{k}"] = v
    copy_tensors_strict(targets, tensors, source, "not used by this method")


def copy_tensors_strict(
    targets: Mapping[str, torch.Tensor], tensors: Mapping[str, torch.Tensor], source: Path, extra_reason: str
) -> None:
    """Copy ``tensors`` into ``targets`` (name -> parameter) only if the names match exactly and every shape fits;
    otherwise raise :class:`AdapterLoadError` naming the missing, unexpected (``extra_reason`` says why they do not
    belong) or mis-shaped tensor, before anything is written."""
    missing = sorted(set(targets) - set(tensors))
    extra = sorted(set(tensors) - set(targets))
    if missing:
        raise AdapterLoadError(f"{source}: missing tensor(s) {', '.join(missing)}")
    if extra:
        raise AdapterLoadError(f"{source}: unexpected tensor(s) {', '.join(extra)} ({extra_reason})")
    for k, t in targets.items():
        if tuple(tensors[k].shape) != tuple(t.shape):
            raise AdapterLoadError(
                f"{source}: tensor {k} has shape {tuple(tensors[k].shape)}, the model expects {tuple(t.shape)}"
            )
    with torch.no_grad():
        for k, t in targets.items():
            t.copy_(tensors[k].to(device=t.device, dtype=t.dtype))
