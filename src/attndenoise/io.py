"""Adapter files: ``attndenoise_config.json`` + ``attndenoise_model.safetensors``, nothing else, never pickle.

The names are our own, so a peft adapter (``adapter_config.json`` + ``adapter_model.safetensors``) and ours can share
a folder, and peft, the Trainer and Hub tools do not take ours for theirs. Folders written before under peft's names
(format 1, same content) still load.

Loading is strict: another base architecture, or a missing, extra or mis-shaped tensor, raises
:class:`AdapterLoadError` naming what is wrong, and leaves the model as it was. ``load`` also accepts a Hub id
(``"org/name"``, through :mod:`attndenoise.hub`).
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
from .config import ConfigError
from .families import attention_layers, family_of, geometry
from .patch import apply, method_modules, remove, require_state
from .wrappers import is_fsdp2, unwrap

CONFIG_NAME = "attndenoise_config.json"
WEIGHTS_NAME = "attndenoise_model.safetensors"
#: the names used up to attndenoise 0.1.0 (peft's): read, never written
LEGACY_CONFIG_NAME = "adapter_config.json"
LEGACY_WEIGHTS_NAME = "adapter_model.safetensors"
FORMAT_VERSION = 1


class AdapterLoadError(ValueError):
    """The adapter does not fit this model."""


def check_base_signature(model: nn.Module, recorded: dict[str, Any], problem: str, source: str) -> None:
    """Raise :class:`AdapterLoadError` ``"<problem> (<each differing field>)"`` when ``model``'s
    :func:`base_signature` differs from the ``recorded`` one (``source`` names the recording side)."""
    actual = base_signature(model)
    diffs = [f"{k}: {source} {recorded.get(k)!r} vs model {actual[k]!r}"
             for k in actual if recorded.get(k) != actual[k]]
    if diffs:
        raise AdapterLoadError(f"{problem} ({'; '.join(diffs)})")


def base_signature(model: nn.Module) -> dict[str, Any]:
    """What an adapter must agree with: family and attention geometry of the base model."""
    model = unwrap(model)
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


def atomic_write(path: str | os.PathLike[str], write: Any) -> None:
    """``write(tmp_path)`` to a temporary file beside ``path``, then rename it into place: a reader (or a resumed
    run after a kill) sees the old file or the whole new one, never half of it. The folder must exist."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """:func:`atomic_write` of a text file."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def atomic_write_json(path: str | os.PathLike[str], obj: Any, indent: int | None = 2) -> None:
    """:func:`atomic_write` of ``obj`` as JSON (non-JSON values through ``str``), creating the folder."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(obj, indent=indent, default=str) + "\n")


_atomic_write = atomic_write


def adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """All method tensors of a patched model (parameters and state buffers such as the schedule step).

    On an FSDP2-sharded model this is a collective (every rank must call it): the root's ``state_dict`` puts FSDP's
    sharded ``DTensor`` objects in place (a submodule's own ``state_dict`` can see freed unsharded storage), and each
    method tensor is all-gathered with ``full_tensor()``; only the method's tensors are gathered, not the model.
    """
    if is_fsdp2(model):
        return _sharded_adapter_tensors(unwrap(model))
    out = {}
    for i, m in method_modules(model).items():
        for k, v in m.state_dict().items():
            out[f"layers.{i}.{k}"] = v.detach().contiguous().clone()
    return out


def _sharded_adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    from torch.distributed.tensor import DTensor

    full = model.state_dict()  # FSDP2's pre-hooks register the sharded parameters before this reads them
    names = {id(m): n for n, m in model.named_modules()}
    out = {}
    for i, m in method_modules(model).items():
        prefix = f"{names[id(m)]}."
        for k in m.state_dict():
            v = full[prefix + k]
            if isinstance(v, DTensor):
                v = v.full_tensor()
            out[f"layers.{i}.{k}"] = v.detach().cpu().contiguous().clone()
    return out


def save(model: nn.Module, directory: str | os.PathLike[str]) -> Path:
    """Write the method's configuration and tensors to ``directory`` (atomic per file).

    On an FSDP2-sharded model call it on every rank (the tensors are gathered collectively); rank 0 writes.
    """
    st = require_state(model)
    d = Path(directory)
    tensors = {k: v.cpu() for k, v in adapter_tensors(model).items()}
    if is_fsdp2(model):
        import torch.distributed as dist

        if dist.get_rank() != 0:
            return d
    d.mkdir(parents=True, exist_ok=True)
    meta = {
        "format_version": FORMAT_VERSION,
        "config": st.config.to_dict(),
        "base": base_signature(model),
    }
    atomic_write(d / WEIGHTS_NAME, lambda p: save_file(tensors, p, metadata={"format": "pt"}))
    atomic_write(d / CONFIG_NAME, lambda p: Path(p).write_text(json.dumps(meta, indent=2) + "\n"))
    return d


def adapter_files(directory: str | os.PathLike[str]) -> tuple[Path, Path]:
    """``(config, weights)`` paths of the adapter in ``directory``: our names, else the legacy (peft's) names of a
    folder we wrote before; a peft adapter alone is refused with what to use instead."""
    d = Path(directory)
    if (d / CONFIG_NAME).is_file():
        return d / CONFIG_NAME, d / WEIGHTS_NAME
    legacy = d / LEGACY_CONFIG_NAME
    if legacy.is_file():
        try:
            meta = json.loads(legacy.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            meta = None
        if isinstance(meta, dict) and "peft_type" in meta:
            raise AdapterLoadError(
                f"{d}: holds a peft adapter ({LEGACY_CONFIG_NAME} with peft_type={meta['peft_type']!r}), no "
                f"attndenoise adapter ({CONFIG_NAME}); load it with peft.PeftModel.from_pretrained"
            )
        return legacy, d / LEGACY_WEIGHTS_NAME
    raise AdapterLoadError(f"{d / CONFIG_NAME}: no adapter config here (expected {CONFIG_NAME} and {WEIGHTS_NAME})")


def read_config(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """The adapter metadata in ``directory`` (config, base signature, format version)."""
    path = adapter_files(directory)[0]
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise AdapterLoadError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(meta, dict) or "config" not in meta or "base" not in meta:
        raise AdapterLoadError(f"{path}: missing 'config' or 'base' section")
    return meta


def load(model: nn.Module, directory: str | os.PathLike[str]) -> nn.Module:
    """Apply the adapter saved in ``directory`` (a folder, or a Hub id ``"org/name"``) to a stock ``model`` of the
    same base; returns the model. ``model`` may be wrapped (PeftModel, DDP, ``torch.compile``)."""
    d = Path(directory)
    if not d.exists():
        from .hub import ADAPTER_FILES, is_hub_id, snapshot

        if is_hub_id(str(directory)):
            d = snapshot(str(directory), ADAPTER_FILES)
    cpath, wpath = adapter_files(d)
    meta = read_config(d)
    check_base_signature(model, meta["base"], f"{d}: adapter was made for another base architecture", "adapter")
    cfg_data = dict(meta["config"]) if isinstance(meta["config"], dict) else {}
    method = cfg_data.pop("method", None)
    if not isinstance(method, str):
        raise AdapterLoadError(f"{cpath}: the 'config' section names no method")
    try:
        config = registry.config_for(method, **cfg_data)
    except ConfigError as e:
        raise AdapterLoadError(f"{cpath}: {e}") from None
    if not wpath.is_file():
        raise AdapterLoadError(f"{wpath}: missing adapter weights")
    tensors = read_tensors(wpath)
    apply(model, config)
    try:
        copy_method_tensors_strict(model, tensors, wpath)
    except Exception:
        remove(model)
        raise
    return model


def read_tensors(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; a truncated or corrupt file raises :class:`AdapterLoadError` naming it
    (safetensors' own error names neither the file nor what to do)."""
    from safetensors import SafetensorError

    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise AdapterLoadError(f"{path}: not a readable safetensors file ({e}); the file is damaged or truncated "
                               "(e.g. a copy that did not finish): write it again") from None


def copy_method_tensors_strict(model: nn.Module, tensors: dict[str, torch.Tensor], source: Path) -> None:
    """Copy a saved method file's ``tensors`` into ``model``'s method modules (names ``layers.<i>.<tensor>``),
    all or nothing (:func:`copy_tensors_strict`)."""
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
    # A NaN or inf in one tensor makes every output NaN (evaluation then scores 0 without saying why): refuse it.
    bad = sorted(k for k in targets if tensors[k].is_floating_point() and not bool(torch.isfinite(tensors[k]).all()))
    if bad:
        raise AdapterLoadError(f"{source}: non-finite values (NaN or inf) in tensor(s) {', '.join(bad)}; the run that "
                               "wrote them diverged: retrain (e.g. with a lower learning rate)")
    with torch.no_grad():
        for k, t in targets.items():
            t.copy_(tensors[k].to(device=t.device, dtype=t.dtype))
