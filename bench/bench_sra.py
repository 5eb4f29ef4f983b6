"""Prefill benchmark of Scaled ReAttention (docs/methods.md, section SRA): time and peak memory, SRA vs stock vs a full-map SRA.

* ``stock``: the stock model (SDPA);
* ``sra``: attndenoise's SRA (fused SDPA for every row, explicit probabilities only for the edited row blocks, in
  slices of ``max_block_elements``);
* ``full-map``: the same rule computed from the full ``n x n`` map of every layer (``attndenoise.reference_mode``,
  the eager reference path; the cost profile of the authors' implementation).

Prefill = ``model(ids, use_cache=True, logits_to_keep=1)`` under ``torch.no_grad()``, batch 1, on a tiny random
Llama (hidden 256, 4 layers, 8 heads, 4 kv heads; query/key projections scaled x4 so the maps are peaky and the rule
edits), with the authors' default SRA constants (b=100, t=200, alpha 0.5/0.3, strengthen 4).
Every configuration runs in its own subprocess: peak memory is that process's resident-size high-water mark, reset
right before the timed prefill, minus its resident size at that point (the model, the input and a short warm-up are
already there). A configuration whose
full maps alone would not fit in memory is skipped and reported as such.

    python bench/bench_sra.py [--lengths 2048 8192 16384] [--repeats 2] [--threads 1]
    python bench/bench_sra.py --quick      # 1024 tokens, 1 repeat; prints only

Writes bench/results/sra.md and the ``<!-- bench:sra -->`` section of BENCHMARKS.md, and prints it.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

from attndenoise.benchmark import machine_info, peak_rss_kib, publish, reset_peak_rss, rss_kib

ROOT = Path(__file__).resolve().parent.parent
MODEL = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
             intermediate_size=688, vocab_size=1024, max_position_embeddings=32768)
VARIANTS = ("stock", "sra", "full-map")
#: float32 copies of one layer's (heads x n x n) map the eager path holds at its peak (scores/softmax/edited copy)
FULL_MAP_COPIES = 3


def _available_kib() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1])
    return 0


def worker(variant: str, length: int, repeats: int, threads: int) -> dict:
    """One configuration in a fresh process: first prefill measured for memory and time, then more for time."""
    import resource

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import attndenoise as ad

    torch.manual_seed(0)
    torch.set_num_threads(threads)
    model = LlamaForCausalLM(LlamaConfig(**MODEL)).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(4.0)
            layer.self_attn.k_proj.weight.mul_(4.0)
    if variant != "stock":
        ad.apply(model, ad.config_for("sra"))
    ids = torch.randint(0, MODEL["vocab_size"], (1, length))

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


def run_one(variant: str, length: int, repeats: int, threads: int) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--worker", variant, str(length), str(repeats), str(threads)],
        check=True, capture_output=True, text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def full_map_need_gib(length: int) -> float:
    return FULL_MAP_COPIES * MODEL["num_attention_heads"] * length * length * 4 / 2**30


def table(rows: dict[tuple[str, int], dict | str], lengths: list[int]) -> str:
    lines = [
        "| n | variant | prefill time (s) | time / stock | peak memory (MiB) | peak / stock "
        "| max abs logit diff vs full-map |",
        "|---|---|---|---|---|---|---|",
    ]
    for n in lengths:
        stock = rows[("stock", n)]
        full = rows.get(("full-map", n))
        for v in VARIANTS:
            r = rows[(v, n)]
            if isinstance(r, str):
                lines.append(f"| {n} | {v} | {r} | | | | |")
                continue
            assert isinstance(stock, dict)
            diff = "n/a"
            if isinstance(full, dict) and v != "full-map":
                diff = f"{max(abs(a - b) for a, b in zip(r['logits'], full['logits'], strict=True)):.1e}"
            lines.append(
                f"| {n} | {v} | {r['time_s']:.2f} | {r['time_s'] / stock['time_s']:.2f} | {r['peak_mib']:.0f} | "
                f"{r['peak_mib'] / stock['peak_mib']:.2f} | {diff if v != 'full-map' else '-'} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=None, help="default 2048 8192 16384 (quick: 1024)")
    ap.add_argument("--repeats", type=int, default=None, help="prefills timed per configuration (default 2, quick 1)")
    ap.add_argument("--quick", action="store_true", help="1024 tokens, 1 repeat, print only (no files written)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads per run (default 1: on a shared 2-core machine, 2 threads measured the "
                         "scheduler more than the method)")
    ap.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(worker(a.worker[0], int(a.worker[1]), int(a.worker[2]), int(a.worker[3]))))
        return
    a.lengths = a.lengths or ([1024] if a.quick else [2048, 8192, 16384])
    a.repeats = a.repeats or (1 if a.quick else 2)
    rows: dict[tuple[str, int], dict | str] = {}
    t_start = time.perf_counter()
    for n in a.lengths:
        for v in VARIANTS:
            if v == "full-map":
                need = full_map_need_gib(n)
                if need > 0.7 * _available_kib() / 2**20:
                    rows[(v, n)] = f"skipped: its maps need ~{need:.0f} GiB, {_available_kib() / 2**20:.0f} GiB free"
                    print(f"{v:>9} @{n}: {rows[(v, n)]}", flush=True)
                    continue
            r = run_one(v, n, 1 if v == "full-map" else a.repeats, a.threads)
            rows[(v, n)] = r
            print(f"{v:>9} @{n}: {r['time_s']:7.2f} s  {r['peak_mib']:8.1f} MiB", flush=True)
    total = time.perf_counter() - t_start
    md = (
        f"### SRA prefill, tiny Llama {MODEL['hidden_size']}d x {MODEL['num_hidden_layers']} layers, "
        f"{MODEL['num_attention_heads']} heads / {MODEL['num_key_value_heads']} kv heads, batch 1, CPU "
        f"({platform.machine()}, {a.threads} thread{'s' if a.threads > 1 else ''}), default SRA constants "
        "(b=100, t=200)\n\n"
        f"Machine: {machine_info(a.threads)}.\n\n"
        "Peak memory: the kernel's resident-size high-water mark (`VmHWM`, reset right before the prefill) of a "
        "fresh process per configuration, minus its resident size at that point (model, input and a warm-up "
        "already resident). Time: best of "
        f"{a.repeats} prefills (full-map: 1). `full-map` is the same rule on the full n x n map of every layer "
        "(`attndenoise.reference_mode`); the last column compares the last-token logits with it.\n\n"
        + table(rows, a.lengths)
        + f"\nTotal benchmark wall time {total:.0f} s.\n"
    )
    print(md)
    if not a.quick:
        publish("sra", md, ROOT)


if __name__ == "__main__":
    main()
