"""Measuring code shared by ``bench/*.py`` and ``attndenoise bench``: speed and memory of methods vs the stock model.

Everything runs on a random Llama of a named shape (:data:`SHAPES`: ``"smollm2"``, SmolLM2-135M-Instruct's
geometry, the default real shape of ``bench/``; ``"toy"``, a tiny one, the quick option), so no download is needed:
values do not matter for speed. Every measuring function takes ``shape`` (default ``"toy"``). Three measurements:

* :func:`step_times`: forward + backward + AdamW step time of several configurations built in *one* process and
  timed round-robin (one step of each per round, the order rotated every round), so that load from other processes
  hits all of them alike; figures are reported as medians over rounds of the per-round ratio to ``stock``.
* :func:`step_peak_mib`: peak resident memory of one training step, meant to run in a fresh process per
  configuration (:func:`run_worker`), because ``ru_maxrss`` is a per-process high-water mark.
* :func:`decode_times`: seconds per generated token of greedy decoding with the KV cache, prefill excluded
  (prefill once, then every round decodes from a copy of the prefilled cache).

Configuration labels: ``"stock"``; ``"stock x2"`` (a stock model whose attention runs twice and averages: the
physical cost of two softmax maps, the yardstick of the two-map methods); any registered trainable method name;
``"opamp re-run"`` (OpAmp with the benchmark-only ``cache_adapted_keys=False``: the key adapters re-run over the whole
cache at every decoding step, as the authors' code does); ``"diffllama"`` (a peer: transformers'
``DiffLlamaForCausalLM``, a from-scratch DIFF model, of the same shape, see :func:`diffllama_config`; it trains its
attention parameters like the stock baselines and is held to no target).

Methods are timed at their initial parameters. None of them skips work when it is the identity at init (lambda = 0,
zero adapters, copied projections): every term of the two-map path is computed, so timing at init is representative.
"""

from __future__ import annotations

import copy
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from . import registry as _registry

#: the toy benchmark model: a tiny Llama (hidden 256, 4 layers, 8 query heads, 4 key/value heads, head dim 32)
MODEL: dict[str, Any] = dict(
    hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
    intermediate_size=688, vocab_size=1024, max_position_embeddings=8192,
)
#: SmolLM2-135M-Instruct's config (random weights here). ``max_position_embeddings`` is 16384 instead of its 8192 so
#: that 8192 tokens of context plus the decoded ones stay within it; with the default RoPE no value depends on it.
SMOLLM2: dict[str, Any] = dict(
    hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
    intermediate_size=1536, vocab_size=49152, max_position_embeddings=16384, rms_norm_eps=1e-5,
    rope_parameters={"rope_type": "default", "rope_theta": 100000.0}, tie_word_embeddings=True,
    bos_token_id=1, eos_token_id=2, pad_token_id=2,
)
#: named benchmark shapes (``LlamaConfig`` keyword arguments)
SHAPES: dict[str, dict[str, Any]] = {"smollm2": SMOLLM2, "toy": MODEL}
_SHAPE_NAMES = {"smollm2": "SmolLM2-135M-Instruct shape", "toy": "tiny Llama"}
#: methods that compute two attention maps per head (the ones held to the "stock x2" yardstick): each method's own
#: ``two_maps`` flag, so a new two-map method is held to the targets without being listed here
TWO_MAP = _registry.two_map_methods()
#: benchmark-only variant label -> (method, config overrides)
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {"opamp re-run": ("opamp", {"cache_adapted_keys": False})}
#: the yardsticks measured in the same run: the stock model, and its attention run twice (what a two-map method costs
#: at best); the training rows ``none`` / ``lora`` are ``attndenoise.train.BASELINES``
REFERENCES = ("stock", "stock x2")
#: peers measured in the same run, held to no target: transformers' from-scratch DIFF model of the same shape
PEERS = ("diffllama",)


def trainable_methods() -> list[str]:
    """Registered trainable methods (``attndenoise.registry.trainable_methods``)."""
    return _registry.trainable_methods()


def shape_config(shape: str = "toy", **overrides: Any) -> dict[str, Any]:
    """The ``LlamaConfig`` keyword arguments of shape ``shape`` (:data:`SHAPES`), with ``overrides`` applied."""
    try:
        cfg = SHAPES[shape]
    except KeyError:
        raise ValueError(f"unknown shape '{shape}'; known: {', '.join(SHAPES)}") from None
    return {**copy.deepcopy(cfg), **overrides}


def head_dim(cfg: dict[str, Any]) -> int:
    return int(cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"])


def model_description(shape: str = "toy") -> str:
    m = shape_config(shape)
    return (f"{_SHAPE_NAMES.get(shape, shape)} ({shape!r}, random weights): {m['hidden_size']}d x "
            f"{m['num_hidden_layers']} layers, {m['num_attention_heads']} heads / {m['num_key_value_heads']} kv "
            f"heads, head dim {head_dim(m)}, MLP {m['intermediate_size']}, vocab {m['vocab_size']}, batch 1")


def diffllama_config(shape: str = "toy", **overrides: Any) -> dict[str, Any]:
    """``DiffLlamaConfig`` keyword arguments of a from-scratch DIFF model of shape ``shape``.

    Same hidden size, layers, MLP, vocabulary and attention projection sizes; the heads in the DIFF paper's layout:
    each of the shape's ``h`` heads (head dim ``d``) becomes one differential head with two ``d/2``-dim query/key
    maps and a ``d``-dim value, which ``DiffLlama`` writes as ``2h`` heads of dim ``d/2`` and ``2 h_kv`` kv heads
    (it pairs head ``i`` with ``i + h``). So ``W_Q``, ``W_K``, ``W_V``, ``W_O`` and the cache are as large as
    stock's (and ``DiffLlama``'s even kv-head count holds for any shape: SmolLM2's 9 / 3 heads are odd). The
    ``lambda`` init is ``DiffLlama``'s default (depth-dependent ``lambda_init``, ``lambda_std_dev`` 0.1).
    """
    cfg = shape_config(shape, **overrides)
    d = head_dim(cfg)
    if d % 2:
        raise ValueError(f"shape {shape!r}: head dim {d} is odd, no DiffLlama layout of the same size")
    cfg.update(num_attention_heads=2 * cfg["num_attention_heads"],
               num_key_value_heads=2 * cfg["num_key_value_heads"], head_dim=d // 2)
    return cfg


def cpu_model() -> str:
    """The CPU model name from ``/proc/cpuinfo`` (else ``platform.processor()``)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


#: CPU flags that matter for these kernels: ``/proc/cpuinfo`` flag -> how tables print it
CPU_FLAGS = {"avx2": "AVX2", "avx512f": "AVX-512", "amx_tile": "AMX"}


def cpu_flags() -> dict[str, bool]:
    """Whether the CPU has each of :data:`CPU_FLAGS` (``/proc/cpuinfo``; all False where it cannot be read)."""
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    return {k: k in flags for k in CPU_FLAGS}


def cpu_summary() -> str:
    """``AMD EPYC (AVX2: yes, AVX-512: no, AMX: no)``: the CPU model and the flags that matter."""
    flags = cpu_flags()
    return f"{cpu_model()} (" + ", ".join(
        f"{name}: {'yes' if flags[k] else 'no'}" for k, name in CPU_FLAGS.items()) + ")"


def machine_info(threads: int) -> str:
    """One line: date, CPU and its flags, core count, thread count, torch and transformers versions."""
    import torch
    import transformers

    date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    return (f"{date}; {cpu_summary()}, {os.cpu_count()} cores; torch.set_num_threads({threads}); "
            f"torch {torch.__version__}, transformers {transformers.__version__}, Python {platform.python_version()}")


def rss_kib() -> int:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") // 1024


def _register_twice() -> str:
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    def twice(module, q, k, v, mask, **kw):  # type: ignore[no-untyped-def]
        o1, _ = sdpa_attention_forward(module, q, k, v, mask, **kw)
        o2, _ = sdpa_attention_forward(module, q, k, v, mask, **kw)
        return 0.5 * (o1 + o2), None

    AttentionInterface.register("sdpa_twice", twice)
    AttentionMaskInterface.register("sdpa_twice", sdpa_mask)
    return "sdpa_twice"


def build_model(label: str, *, train: bool, seed: int = 0, lambda_value: float | None = None, shape: str = "toy",
                overrides: dict[str, Any] | None = None) -> Any:
    """The random Llama of shape ``shape`` for configuration ``label`` (see module docstring), in train or eval mode.

    ``lambda_value`` (training benchmark): set every ``lambda_learn`` to it, so no term is zero. For a training
    step the stock baselines and the ``diffllama`` peer train their attention projections (the methods train their
    own parameters). ``overrides``: ``LlamaConfig`` fields replacing the shape's (e.g. fewer layers in a test).
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from . import config_for, method_modules
    from . import patch as _patch

    torch.manual_seed(seed)
    model: Any
    if label == "diffllama":
        from transformers import DiffLlamaConfig, DiffLlamaForCausalLM

        model = DiffLlamaForCausalLM(DiffLlamaConfig(**diffllama_config(shape, **(overrides or {}))))
    else:
        model = LlamaForCausalLM(LlamaConfig(**shape_config(shape, **(overrides or {}))))
    model.set_attn_implementation("sdpa")  # the default on CPU torch; explicit so "stock" means SDPA
    if label == "stock x2":
        model.set_attn_implementation(_register_twice())
    elif label not in ("stock", *PEERS):
        method, kw = VARIANTS.get(label, (label, {}))
        _patch.apply(model, config_for(method, **kw))
        if lambda_value is not None:
            with torch.no_grad():
                for m in method_modules(model).values():
                    for name, p in m.named_parameters():
                        if name.endswith("lambda_learn"):
                            p.fill_(lambda_value)
    if label in REFERENCES or label in PEERS:
        for p in model.parameters():
            p.requires_grad_(False)
        for layer in model.model.layers:
            for p in layer.self_attn.parameters():
                p.requires_grad_(train)
    return model.train(train)


class _Trainer:
    """One configuration's model, optimizer and input for repeated training steps."""

    def __init__(self, label: str, length: int, shape: str = "toy") -> None:
        import torch

        self.model = build_model(label, train=True, lambda_value=0.5, shape=shape)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(params, lr=1e-4)
        g = torch.Generator().manual_seed(1)
        self.x = torch.randint(0, shape_config(shape)["vocab_size"], (1, length), generator=g)

    def step(self, x: Any = None) -> None:
        x = self.x if x is None else x
        self.opt.zero_grad(set_to_none=True)
        # no KV cache, as in training: transformers' Trainer sets ``config.use_cache`` to its ``use_cache``
        # argument (False by default), while a bare model call would build a cache from the config's True
        self.model(x, labels=x, use_cache=False).loss.backward()
        self.opt.step()


def _rotations(labels: Sequence[str], rounds: int) -> list[list[str]]:
    """Round ``r`` runs the labels rotated by ``r`` (each configuration in each position across rounds)."""
    n = len(labels)
    return [[labels[(i + r) % n] for i in range(n)] for r in range(rounds)]


def _log(msg: str, quiet: bool) -> None:
    if not quiet:
        print(msg, file=sys.stderr, flush=True)


def step_times(labels: Sequence[str], length: int, rounds: int, *, warmup: int = 1, min_seconds: float = 0.3,
               quiet: bool = False, shape: str = "toy") -> dict[str, list[float]]:
    """Seconds per training step of each configuration, one list entry per round (interleaved, see module doc).

    A round runs each configuration for ``k`` consecutive steps (``k`` chosen once, after warm-up, so that the
    fastest configuration's ``k`` steps last at least ``min_seconds``) and records the mean step time."""
    trainers = {lab: _Trainer(lab, length, shape) for lab in labels}
    warm: dict[str, float] = {}
    for lab, t in trainers.items():
        for _ in range(warmup):
            t0 = time.perf_counter()
            t.step()
            warm[lab] = time.perf_counter() - t0
        _log(f"  warm-up {lab} @{length}", quiet)
    # short steps are repeated within a round so that one measurement lasts >= min_seconds (timer and scheduler noise)
    inner = max(1, math.ceil(min_seconds / max(min(warm.values(), default=min_seconds), 1e-6)))
    out: dict[str, list[float]] = {lab: [] for lab in labels}
    for r, order in enumerate(_rotations(list(labels), rounds)):
        for lab in order:
            t0 = time.perf_counter()
            for _ in range(inner):
                trainers[lab].step()
            out[lab].append((time.perf_counter() - t0) / inner)
        _log(f"  round {r + 1}/{rounds} @{length}: " + ", ".join(
            f"{lab} {out[lab][-1] * 1000:.0f}" for lab in labels) + " ms", quiet)
    return out


def reset_peak_rss() -> bool:
    """Reset the kernel's resident-size high-water mark (``VmHWM``) of this process; False where not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise OSError("no VmHWM in /proc/self/status")


def step_peak_mib(label: str, length: int, shape: str = "toy") -> float:
    """Peak memory of one training step above the resident size right before it, in MiB.

    The kernel's high-water mark is reset right before the step (``/proc/self/clear_refs``), so only the step's own
    peak counts; where that is not possible, ``ru_maxrss`` is used, which also counts any earlier transient peak of
    the process: call in a fresh process either way. A warm-up step on 16 tokens first creates the optimizer state,
    so the figure is a steady-state step: activations, gradients and temporaries.
    """
    import resource

    t = _Trainer(label, length, shape)
    t.step(t.x[:, :16])
    base = rss_kib()
    reset = reset_peak_rss()
    t.step()
    peak = peak_rss_kib() if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return (peak - base) / 1024


#: the memory workers' allocator settings. ``glibc``: the process as a user runs it (glibc's default, whose mmap
#: threshold adapts upwards to 32 MiB, so most activation tensors live in the heap, where freed blocks of other sizes
#: are kept and the resident size grows with fragmentation). ``mmap``: ``MALLOC_MMAP_THRESHOLD_=65536`` (a fixed
#: threshold: every block above 64 KiB is its own mapping, returned to the kernel when freed), so the peak resident
#: size is what the step holds live. The same step measured both ways tells the method's own memory from the heap's.
ALLOCATORS: dict[str, dict[str, str]] = {"glibc": {}, "mmap": {"MALLOC_MMAP_THRESHOLD_": "65536"}}


def step_peaks_mib(labels: Sequence[str], length: int, threads: int, parallel: int = 2, *, shape: str = "toy",
                   skip_failed: bool = False, allocator: str = "glibc") -> dict[str, float]:
    """:func:`step_peak_mib` of each configuration, each in its own fresh process, ``parallel`` at a time (the
    processes' resident sizes are their own, so running them side by side does not change the figures; at a real
    shape's long lengths one at a time, so that they fit in memory together).

    ``skip_failed``: a configuration whose worker fails (e.g. killed for memory) is left out of the result (and
    reported on stderr) instead of raising. ``allocator``: a key of :data:`ALLOCATORS`, the workers' malloc
    settings."""
    from concurrent.futures import ThreadPoolExecutor

    def one(lab: str) -> float | None:
        try:
            return float(run_worker("step_peak_mib", threads, env=ALLOCATORS[allocator], label=lab, length=length,
                                    shape=shape))
        except subprocess.CalledProcessError as e:
            if not skip_failed:
                raise
            _log(f"  step peak {lab} @{length}: worker failed (exit status {e.returncode}; out of memory?)", False)
            return None

    with ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
        peaks = list(pool.map(one, labels))
    return {lab: p for lab, p in zip(labels, peaks, strict=True) if p is not None}


def decode_times(labels: Sequence[str], context: int, new_tokens: int, rounds: int, *,
                 quiet: bool = False, shape: str = "toy", compiled: bool = False) -> dict[str, list[float]]:
    """Seconds per generated token (greedy, KV cache, prefill excluded), one list entry per round.

    Each configuration prefills ``context`` tokens once (``use_cache=True``); every round then decodes
    ``new_tokens`` tokens one at a time from a deep copy of that prefilled cache, feeding back the argmax token.
    Every configuration decodes exactly the same number of steps over the same cache lengths.

    ``compiled``: decode with ``torch.compile(model, dynamic=True)`` of every configuration (stock included; the
    prefill stays eager). The warm-up decode compiles (about 40 s per configuration of the toy shape on a loaded
    2-core CPU); ``dynamic=True`` so the growing cache does not recompile at the second step.
    """
    import torch

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, shape_config(shape)["vocab_size"], (1, context), generator=g)
    models, caches, firsts = {}, {}, {}
    with torch.no_grad():
        for lab in labels:
            m = build_model(lab, train=False, shape=shape)
            out = m(ids, use_cache=True, logits_to_keep=1)
            models[lab], caches[lab] = (torch.compile(m, dynamic=True) if compiled else m), out.cache
            firsts[lab] = out.logits[:, -1:].argmax(-1)
            _log(f"  prefilled {lab} @{context}", quiet)

    def decode(lab: str) -> float:
        cache = copy.deepcopy(caches[lab])
        tok = firsts[lab]
        with torch.no_grad():
            t0 = time.perf_counter()
            for _ in range(new_tokens):
                out = models[lab](tok, cache=cache, use_cache=True)
                cache, tok = out.cache, out.logits[:, -1:].argmax(-1)
            return (time.perf_counter() - t0) / new_tokens

    for lab in labels:  # warm-up: one decode each (compiles, where compiled)
        t0 = time.perf_counter()
        decode(lab)
        if compiled:
            _log(f"  compiled {lab} in {time.perf_counter() - t0:.0f} s", quiet)
    res: dict[str, list[float]] = {lab: [] for lab in labels}
    for r, order in enumerate(_rotations(list(labels), rounds)):
        for lab in order:
            res[lab].append(decode(lab))
        _log(f"  round {r + 1}/{rounds} @{context}: " + ", ".join(
            f"{lab} {res[lab][-1] * 1000:.2f}" for lab in labels) + " ms/token", quiet)
    return res


def median_ratio(a: Sequence[float], b: Sequence[float]) -> float:
    """Median over rounds of ``a[i] / b[i]`` (both measured in round ``i``)."""
    return statistics.median(x / y for x, y in zip(a, b, strict=True))


# -- worker processes -----------------------------------------------------------------------------------------------

_TASKS: dict[str, Callable[..., Any]] = {
    "step_times": step_times, "step_peak_mib": step_peak_mib, "decode_times": decode_times,
}


def run_worker(task: str, threads: int, env: dict[str, str] | None = None, **kwargs: Any) -> Any:
    """Run measurement ``task`` (a function name of this module) in a fresh Python process with
    ``torch.set_num_threads(threads)`` and the extra environment ``env``; returns its result. Its progress lines go
    to this process's stderr."""
    spec = json.dumps({"task": task, "threads": threads, "kwargs": kwargs})
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), **(env or {}))
    out = subprocess.run([sys.executable, "-m", "attndenoise.benchmark", spec], check=True, stdout=subprocess.PIPE,
                         text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _worker_main(spec_json: str) -> None:
    import torch

    spec = json.loads(spec_json)
    torch.set_num_threads(int(spec["threads"]))
    result = _TASKS[spec["task"]](**spec["kwargs"])
    print(json.dumps(result))


# -- markdown ---------------------------------------------------------------------------------------------------------


def write_section(name: str, body: str, path: Path) -> None:
    """Replace the text between ``<!-- bench:name -->`` and ``<!-- /bench:name -->`` in ``path`` (append if absent)."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    block = f"{start}\n{body.rstrip()}\n\n{end}"
    if start in text and end in text:
        a, b = text.index(start), text.index(end) + len(end)
        text = text[:a] + block + text[b:]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)


def publish(name: str, md: str, root: Path) -> None:
    """Write a benchmark's table to ``bench/results/<name>.md`` and to its section of ``BENCHMARKS.md`` under
    ``root`` (the repository)."""
    results = root / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    (results / f"{name}.md").write_text(md)
    write_section(name, md, root / "BENCHMARKS.md")


def fmt_ratio(x: float, limit: float | None = None) -> str:
    """``1.07``, with a mark when over ``limit``."""
    s = f"{x:.2f}"
    return s if limit is None or x <= limit else f"**{s}** ✗"


if __name__ == "__main__":
    _worker_main(sys.argv[1])
