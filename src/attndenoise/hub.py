"""Whole patched models and the Hugging Face Hub.

* :func:`save_pretrained` / :func:`from_pretrained`: the base model (transformers' own files, without the method's
  tensors) plus the adapter files in one folder. ``AutoModelForCausalLM.from_pretrained`` on such a folder gives
  the *stock* model: transformers has no hook through which a third-party attention method could be restored, so
  the method comes back only through :func:`from_pretrained` (a plain ``model.save_pretrained`` on a patched model
  warns about exactly this).
* :func:`push_to_hub` uploads an adapter (or a whole model) with ``huggingface_hub``'s ``upload_folder``;
  :func:`attndenoise.load` and :func:`from_pretrained` accept a Hub id and fetch it with ``snapshot_download``
  (honouring ``HF_HUB_OFFLINE`` and the local cache).
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Any

from torch import nn

from .io import (
    CONFIG_NAME,
    LEGACY_CONFIG_NAME,
    LEGACY_WEIGHTS_NAME,
    WEIGHTS_NAME,
    AdapterLoadError,
    adapter_files,
    load,
    save,
)
from .patch import _SLOT, require_state
from .wrappers import is_adapted, unwrap

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9_.-]+$")
ADAPTER_FILES = [CONFIG_NAME, WEIGHTS_NAME, LEGACY_CONFIG_NAME, LEGACY_WEIGHTS_NAME]


def is_hub_id(name: str) -> bool:
    """``"org/name"`` (one slash, no path syntax): what a Hub repository id looks like."""
    return bool(_HUB_ID.match(name)) and ".." not in name


def snapshot(repo_id: str, allow_patterns: list[str] | None = None) -> Path:
    """A local folder with the files of Hub repository ``repo_id`` (``snapshot_download``: the cache first; with
    ``HF_HUB_OFFLINE=1`` the cache only). Any failure is one :class:`AdapterLoadError` naming the id."""
    from huggingface_hub import constants, snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=allow_patterns))
    except Exception as e:  # network, auth, missing repo, not cached while offline: all end up here
        offline = bool(constants.HF_HUB_OFFLINE)
        how = ("HF_HUB_OFFLINE=1 is set and it is not in the local Hugging Face cache "
               f"({constants.HF_HUB_CACHE}); unset HF_HUB_OFFLINE to download it, or pass a local folder"
               if offline else f"it could not be fetched from the Hub ({type(e).__name__}: {e})")
        raise AdapterLoadError(f"'{repo_id}' is no local folder, and as a Hub id {how}") from None


def _local(directory: str | os.PathLike[str], allow_patterns: list[str] | None = None) -> Path:
    d = Path(directory)
    if not d.exists() and is_hub_id(str(directory)):
        return snapshot(str(directory), allow_patterns)
    return d


def _method_keys(base: nn.Module) -> set[str]:
    """State-dict keys of the method modules (``...self_attn.attndenoise.*``)."""
    return {k for k in base.state_dict() if f".{_SLOT}." in f".{k}"}


def save_pretrained(
    model: nn.Module, directory: str | os.PathLike[str], tokenizer: Any = None, **kwargs: Any
) -> Path:
    """Write a whole patched model: the base as transformers saves it (without the method's tensors), the adapter
    files beside it, and ``tokenizer`` if given. :func:`from_pretrained` restores it; ``kwargs`` go to
    transformers' ``save_pretrained`` (``max_shard_size``, ...).

    A model under a peft adapter is refused: merge it first (``merge_and_unload``), or save the LoRA with peft and
    the method with :func:`attndenoise.save`.
    """
    base = unwrap(model)
    st = require_state(base)
    adapted = sorted(n for n, m in base.named_modules() if is_adapted(m))
    if adapted:
        raise ValueError(
            f"the model carries a peft adapter ({adapted[0]}, ...): merge it into the base first "
            "(model = peft_model.merge_and_unload()), or save the LoRA with peft_model.save_pretrained and the "
            "method with attndenoise.save"
        )
    d = Path(directory)
    drop = _method_keys(base)
    state_dict = {k: v for k, v in base.state_dict().items() if k not in drop}
    impl = base.config._attn_implementation  # type: ignore[union-attr]
    base.config._attn_implementation = st.original_impl  # type: ignore[union-attr]  # config.json: the stock one
    try:
        type(base).save_pretrained(base, str(d), state_dict=state_dict, **kwargs)  # type: ignore[attr-defined]
    finally:
        base.config._attn_implementation = impl  # type: ignore[union-attr]
    save(base, d)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(d))
    return d


def from_pretrained(directory: str | os.PathLike[str], model_class: Any = None, **kwargs: Any) -> nn.Module:
    """The patched model saved by :func:`save_pretrained` (a folder or a Hub id): base weights, method config and
    method tensors. ``model_class`` defaults to ``AutoModelForCausalLM``; ``kwargs`` go to its ``from_pretrained``
    (``dtype``, ``device_map``, ...)."""
    d = _local(directory)
    adapter_files(d)  # a folder without our adapter fails here, before the base is loaded
    if model_class is None:
        from transformers import AutoModelForCausalLM

        model_class = AutoModelForCausalLM
    model = model_class.from_pretrained(str(d), **kwargs)
    return load(model, d)


def push_to_hub(
    model: nn.Module, repo_id: str, *, whole_model: bool = False, tokenizer: Any = None, private: bool | None = None,
    token: str | None = None, commit_message: str | None = None,
) -> Any:
    """Upload the adapter (or, with ``whole_model``, what :func:`save_pretrained` writes) to Hub repository
    ``repo_id``, creating it if needed; returns ``huggingface_hub``'s commit info."""
    from huggingface_hub import HfApi

    name = require_state(model).config.name
    with tempfile.TemporaryDirectory(prefix="attndenoise-push-") as tmp:
        if whole_model:
            save_pretrained(model, tmp, tokenizer=tokenizer)
        else:
            save(model, tmp)
        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True)
        return api.upload_folder(
            repo_id=repo_id, folder_path=tmp,
            commit_message=commit_message or f"attndenoise {name} {'model' if whole_model else 'adapter'}",
        )


__all__ = ["save_pretrained", "from_pretrained", "push_to_hub", "is_hub_id", "snapshot", "ADAPTER_FILES"]
