"""Prefill benchmark of Scaled ReAttention (docs/methods.md, section SRA): time and peak memory vs stock, full-map SRA.

* ``stock``: the stock model (SDPA);
* ``sra``: attndenoise's SRA (fused SDPA for every row, explicit probabilities only for the edited row blocks, in
  slices of ``max_block_elements``);
* ``full-map``: the same rule computed from the full ``n x n`` map of every layer (``attndenoise.reference_mode``,
  the eager reference path; the cost profile of the authors' implementation): the peer.

Prefill = ``model(ids, use_cache=True, logits_to_keep=1)`` under ``torch.no_grad()``, batch 1, on a random Llama of
shape ``--shape``: ``smollm2`` (default; SmolLM2-135M-Instruct's geometry: 30 layers, hidden 576, 9 heads, 3 kv
heads, head dim 64) or ``toy`` (hidden 256, 4 layers, 8 heads, 4 kv heads, the quick option); query/key projections
scaled x4 so the maps are peaky and the rule edits; the authors' default SRA constants (b=100, t=200, alpha
0.5/0.3, strengthen 4).
Every configuration runs in its own subprocess: peak memory is that process's resident-size high-water mark, reset
right before the timed prefill, minus its resident size at that point (the model, the input and a short warm-up are
already there). A configuration whose full maps alone would not fit in memory is skipped and reported as such.

    python bench/bench_sra.py [--shape smollm2|toy] [--lengths 2048 8192] [--repeats 2] [--threads 1]
    python bench/bench_sra.py --quick      # toy shape, 1024 tokens, 1 repeat; prints only

Defaults: smollm2 2048 / 8192 tokens; toy 2048 / 8192 / 16384.
Writes bench/results/sra.md and the ``<!-- bench:sra -->`` section of BENCHMARKS.md (not with --quick), and prints it.
Targets (issue 16): SRA prefill <= 1.3 x stock time and <= 1.1 x stock peak memory at 8192 tokens.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from attndenoise import benchmark as B
from attndenoise.benchmark import machine_info, peak_rss_kib, publish, reset_peak_rss, rss_kib

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = ("stock", "sra", "full-map")
TIME_LIMIT = 1.3  # sra prefill time x stock, at TARGET_LENGTH
MEM_LIMIT = 1.1  # sra prefill peak memory x stock, at TARGET_LENGTH
TARGET_LENGTH = 8192
DEFAULT_LENGTHS = {"smollm2": [2048, 8192], "toy": [2048, 8192, 16384]}


def model_config(shape: str, length: int) -> dict:
    """The shape's config, with room for ``length`` positions (the default RoPE does not depend on the maximum)."""
    cfg = B.shape_config(shape)
    cfg["max_position_embeddings"] = max(cfg["max_position_embeddings"], length, 32768)
    return cfg
#: float32 copies of one layer's (heads x n x n) map the eager path holds at its peak (scores/softmax/edited copy)
FULL_MAP_COPIES = 3


def _available_kib() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1])
    return 0


def worker(variant: str, length: int, repeats: int, threads: int, shape: str = "toy") -> dict:
    """One configuration in a fresh process: first prefill measured for memory and time, then more for time."""
    import resource

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import attndenoise as ad

    torch.manual_seed(0)
    torch.set_num_threads(threads)
    cfg = model_config(shape, length)
    model = LlamaForCausalLM(LlamaConfig(**cfg)).eval()
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(4.0)
            layer.self_attn.k_proj.weight.mul_(4.0)
    if variant != "stock":
        ad.apply(model, ad.config_for("sra"))
    ids = torch.randint(0, cfg["vocab_size"], (1, length))

    def prefill() -> torch.Tensor:
        with torch.no_grad():
            if variant == "full-map":
                with ad.reference_mode(model):
                    return model(ids, use_cache=True, logits_to_keep=1).logits
            return model(ids, use_cache=True, logits_to_keep=1).logits

    with torch.no_grad():  # warm-up on a short prompt (kernels, allocator); long enough for the SRA rule
        model(ids[:, :512], use_cache=True, logits_to_keep=1)
    base = rss_kib()
    # Reset the kernel's high-water mark so only the measured prefill's peak counts (not the warm-up's); where that
    # is impossible, fall back to ru_maxrss, which also holds any earlier peak of this fresh process.
    reset = reset_peak_rss()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        logits = prefill()
        times.append(time.perf_counter() - t0)
        if len(times) == 1:
            peak = (peak_rss_kib() if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) - base
    return {"variant": variant, "length": length, "time_s": min(times), "peak_mib": peak / 1024,
            "logits": logits[0, -1].tolist()}


def run_one(variant: str, length: int, repeats: int, threads: int, shape: str) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--worker", variant, str(length), str(repeats), str(threads), shape],
        check=True, capture_output=True, text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def full_map_need_gib(length: int, shape: str) -> float:
    return FULL_MAP_COPIES * B.shape_config(shape)["num_attention_heads"] * length * length * 4 / 2**30


def table(rows: dict[tuple[str, int], dict | str], lengths: list[int]) -> str:
    lines = [
        "| n | variant | prefill time (s) | time / stock | peak memory (MiB) | peak / stock "
        "| max abs logit diff vs full-map | target met |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for n in lengths:
        stock = rows[("stock", n)]
        full = rows.get(("full-map", n))
        for v in VARIANTS:
            r = rows[(v, n)]
            if isinstance(r, str):
                lines.append(f"| {n} | {v} | {r} | | | | | |")
                continue
            assert isinstance(stock, dict)
            diff = "n/a"
            if isinstance(full, dict) and v != "full-map":
                diff = f"{max(abs(a - b) for a, b in zip(r['logits'], full['logits'], strict=True)):.1e}"
            held = v == "sra" and n == TARGET_LENGTH
            rt, rm = r["time_s"] / stock["time_s"], r["peak_mib"] / stock["peak_mib"]
            verdict = ("yes" if rt <= TIME_LIMIT and rm <= MEM_LIMIT else "**no**") if held else "-"
            lines.append(
                f"| {n} | {v} | {r['time_s']:.2f} | {B.fmt_ratio(rt, TIME_LIMIT if held else None)} | "
                f"{r['peak_mib']:.0f} | {B.fmt_ratio(rm, MEM_LIMIT if held else None)} | "
                f"{diff if v != 'full-map' else '-'} | {verdict} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(B.SHAPES), default=None,
                    help="model shape (default smollm2; quick: toy)")
    ap.add_argument("--lengths", type=int, nargs="+", default=None,
                    help="default smollm2 2048 8192, toy 2048 8192 16384 (quick: 1024)")
    ap.add_argument("--repeats", type=int, default=None, help="prefills timed per configuration (default 2, quick 1)")
    ap.add_argument("--quick", action="store_true",
                    help="toy shape, 1024 tokens, 1 repeat, print only (no files written)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads per run (default 1: on a shared 2-core machine, 2 threads measured the "
                         "scheduler more than the method)")
    ap.add_argument("--note", default="", help="a line added to the output header (e.g. machine load)")
    ap.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(worker(a.worker[0], int(a.worker[1]), int(a.worker[2]), int(a.worker[3]), a.worker[4])))
        return
    shape = a.shape or ("toy" if a.quick else "smollm2")
    a.lengths = a.lengths or ([1024] if a.quick else DEFAULT_LENGTHS[shape])
    a.repeats = a.repeats or (1 if a.quick else 2)
    rows: dict[tuple[str, int], dict | str] = {}
    t_start = time.perf_counter()
    for n in a.lengths:
        for v in VARIANTS:
            if v == "full-map":
                need = full_map_need_gib(n, shape)
                if need > 0.7 * _available_kib() / 2**20:
                    rows[(v, n)] = f"skipped: its maps need ~{need:.0f} GiB, {_available_kib() / 2**20:.0f} GiB free"
                    print(f"{v:>9} @{n}: {rows[(v, n)]}", flush=True)
                    continue
            r = run_one(v, n, 1 if v == "full-map" else a.repeats, a.threads, shape)
            rows[(v, n)] = r
            print(f"{v:>9} @{n}: {r['time_s']:7.2f} s  {r['peak_mib']:8.1f} MiB", flush=True)
    total = time.perf_counter() - t_start
    md = (
        f"### SRA prefill, {B.model_description(shape)}, CPU: {B.cpu_summary()}, "
        f"{a.threads} thread{'s' if a.threads > 1 else ''}, default SRA constants (b=100, t=200)\n\n"
        f"Machine: {machine_info(a.threads)}.\n"
        + (f"{a.note}\n" if a.note else "")
        + "\nPeak memory: the kernel's resident-size high-water mark (`VmHWM`, reset right before the prefill) of a "
        "fresh process per configuration, minus its resident size at that point (model, input and a warm-up "
        "already resident). Time: best of "
        f"{a.repeats} prefills (full-map: 1). Query/key projections scaled x4 (peaky maps, so the rule edits). "
        "`full-map` is the same rule on the full n x n map of every layer "
        "(`attndenoise.reference_mode`, the authors' cost profile); the last column but one compares the last-token "
        f"logits with it. Target: sra <= {TIME_LIMIT} x stock time and <= {MEM_LIMIT} x stock peak memory at "
        f"{TARGET_LENGTH} tokens (values over a target in bold with ✗).\n\n"
        + table(rows, a.lengths)
        + f"\nTotal benchmark wall time {total:.0f} s.\n"
    )
    print(md)
    if not a.quick:
        publish("sra", md, ROOT)


if __name__ == "__main__":
    main()
