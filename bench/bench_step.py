"""Training-step benchmark: forward+backward+AdamW time and peak memory, each method vs the stock model (same run).

Shapes (``--shape``): ``smollm2`` (default; SmolLM2-135M-Instruct's geometry with random weights: 30 layers, hidden
576, 9 heads, 3 kv heads, head dim 64, vocab 49152) or ``toy`` (the tiny 4-layer Llama, the quick option).

Time: for each sequence length one worker process builds every configuration (stock, stock x2, each method and the
``diffllama`` peer) and times them round-robin, one measurement of each per round with the order rotated every
round, after one warm-up step each (a measurement is the mean of k consecutive steps, k chosen so that it lasts
>= 0.3 s); the table reports, per configuration, the median over rounds of its step time divided by stock's (or
stock x2's) step time *in the same round*, so load from other processes on a shared machine hits numerator and
denominator alike. ``stock x2`` is a stock model whose attention runs twice (the physical cost of two softmax maps),
the yardstick of the two-map methods. ``diffllama`` is transformers' ``DiffLlamaForCausalLM`` of the same shape (a
from-scratch DIFF model, its attention parameters trained like stock's), next to the ``diff`` retrofit: a peer,
held to no target.

Memory: every (configuration, length) runs in its own fresh process (two at a time on the toy, one at a time on
smollm2, so that long steps fit in memory): one 16-token warm-up step (creates the optimizer state), then the peak
resident size of one full step (kernel high-water mark ``VmHWM``, reset right before the step) above the resident
size right before it, under each allocator setting of ``--allocators`` (default both: ``glibc``, glibc's default,
and ``mmap``, ``MALLOC_MMAP_THRESHOLD_=65536``, whose peak is what the step holds live, without heap fragmentation;
``attndenoise.benchmark.ALLOCATORS``). A worker that fails (e.g. killed for memory) is reported as such in the table.
``--memory-only`` skips the step times and writes the ``step-memory`` section instead of ``step``.

    python bench/bench_step.py [--shape smollm2|toy] [--lengths 512 1024 2048] [--mem-lengths 4096 8192]
                               [--methods daa dex ...] [--rounds 3] [--threads 1]
    python bench/bench_step.py --quick      # toy shape, short lengths, 2 rounds; prints only

Defaults: smollm2: time at 512 / 1024 / 2048 tokens, 3 rounds, peak memory at 4096 / 8192; toy: time at 512 / 1024 /
4096, 5 rounds, peak memory at 512 / 1024 / 4096.
Writes bench/results/step.md and the ``<!-- bench:step -->`` section of BENCHMARKS.md (not with --quick).
Targets (issue 16): step time <= 1.10 x stock x2 for every two-map method at every length; peak memory at 4096
<= 1.20 x stock for every method.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from attndenoise import benchmark as B

ROOT = Path(__file__).resolve().parent.parent

TIME_LIMIT = 1.10  # x stock x2, two-map methods
MEM_LIMIT = 1.20  # x stock, every method, at MEM_TARGET_LENGTH
MEM_TARGET_LENGTH = 4096

#: per shape: time lengths, memory lengths, rounds, memory processes at a time
DEFAULTS = {
    "smollm2": dict(lengths=[512, 1024, 2048], mem_lengths=[4096, 8192], rounds=3, mem_parallel=1),
    "toy": dict(lengths=[512, 1024, 4096], mem_lengths=[512, 1024, 4096], rounds=5, mem_parallel=2),
}
QUICK = dict(lengths=[128, 256], mem_lengths=[256], rounds=2, mem_parallel=2)


def row_name(lab: str) -> str:
    if lab in B.PEERS:
        return f"{lab} (peer, from scratch)"
    return lab + (" (2 maps)" if lab in B.TWO_MAP else "")


MemKey = tuple[int, str]  # (length, allocator)


def table(times: dict[int, dict[str, list[float]]], mem: dict[MemKey, dict[str, float]], lengths: list[int],
          mem_keys: list[MemKey], labels: list[str]) -> str:
    several = len({a for _, a in mem_keys}) > 1
    columns = ["method", *(c for n in lengths for c in (f"time/stock @{n}", f"time/(stock x2) @{n}")),
               *(f"peak mem/stock @{n}{f' ({a})' if several else ''}" for n, a in mem_keys), "targets met"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for lab in labels:
        held = lab not in B.REFERENCES and lab not in B.PEERS
        cells, ok = [], []
        for n in lengths:
            t = times[n]
            r1, r2 = B.median_ratio(t[lab], t["stock"]), B.median_ratio(t[lab], t["stock x2"])
            limit_t = TIME_LIMIT if lab in B.TWO_MAP else None
            cells += [f"{r1:.2f}", B.fmt_ratio(r2, limit_t)]
            if limit_t is not None:
                ok.append(r2 <= limit_t)
        for key in mem_keys:
            limit_m = MEM_LIMIT if key[0] == MEM_TARGET_LENGTH and held else None
            if lab not in mem[key] or "stock" not in mem[key]:
                cells.append("failed" if lab not in mem[key] else "n/a (stock failed)")
                if limit_m is not None:
                    ok.append(False)
                continue
            rm = mem[key][lab] / mem[key]["stock"]
            cells.append(B.fmt_ratio(rm, limit_m))
            if limit_m is not None:
                ok.append(rm <= limit_m)
        verdict = ("yes" if all(ok) else "**no**") if held and ok else "-"
        lines.append(f"| {row_name(lab)} | " + " | ".join(cells) + f" | {verdict} |")
    abs_lines = [
        f"- {n} tokens: stock {statistics.median(times[n]['stock']) * 1000:.0f} ms/step "
        f"(stock x2 {statistics.median(times[n]['stock x2']) * 1000:.0f} ms)"
        for n in lengths
    ] + [
        f"- {n} tokens: stock step peak{f' ({a} allocator)' if several else ''} "
        + (f"{mem[(n, a)]['stock']:.0f} MiB" if "stock" in mem[(n, a)] else "failed")
        for n, a in mem_keys
    ]
    return "\n".join(lines) + "\n\nAbsolute (medians):\n\n" + "\n".join(abs_lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(B.SHAPES), default=None,
                    help="model shape (default smollm2; quick: toy)")
    ap.add_argument("--lengths", type=int, nargs="+", default=None,
                    help="step-time lengths (default smollm2 512 1024 2048, toy 512 1024 4096; quick 128 256)")
    ap.add_argument("--mem-lengths", type=int, nargs="+", default=None,
                    help="step peak-memory lengths (default smollm2 4096 8192, toy 512 1024 4096; quick 256)")
    ap.add_argument("--methods", nargs="+", default=None, help="default: every trainable registered method")
    ap.add_argument("--rounds", type=int, default=None, help="timed rounds per length (default smollm2 3, toy 5, "
                                                             "quick 2)")
    ap.add_argument("--mem-parallel", type=int, default=None,
                    help="memory processes at a time (default smollm2 1, toy 2)")
    ap.add_argument("--allocators", nargs="+", choices=sorted(B.ALLOCATORS), default=["glibc", "mmap"],
                    help="malloc settings of the memory workers (default both): glibc = the default a user runs "
                         "with; mmap = MALLOC_MMAP_THRESHOLD_=65536, every tensor its own mapping, so the peak is "
                         "what the step holds live, without heap fragmentation")
    ap.add_argument("--memory-only", action="store_true",
                    help="peak memory only (no step times); written to the step-memory section")
    ap.add_argument("--time-only", action="store_true",
                    help="skip the peak-memory measurement (the step section then holds the time columns only)")
    ap.add_argument("--no-peers", action="store_true", help="leave out the diffllama peer")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads per worker (default 1: on a shared 2-core machine 2 threads measure the "
                         "scheduler more than the method)")
    ap.add_argument("--quick", action="store_true", help="toy shape, short lengths, 2 rounds, print only (no files "
                                                         "written)")
    ap.add_argument("--note", default="", help="a line added to the output header (e.g. machine load)")
    a = ap.parse_args()
    shape = a.shape or ("toy" if a.quick else "smollm2")
    d = QUICK if a.quick else DEFAULTS[shape]
    lengths = [] if a.memory_only else a.lengths or d["lengths"]
    if a.time_only and a.memory_only:
        ap.error("--time-only and --memory-only exclude each other")
    mem_lengths = [] if a.time_only else a.mem_lengths or d["mem_lengths"]
    rounds = a.rounds or d["rounds"]
    mem_parallel = a.mem_parallel or d["mem_parallel"]
    methods = a.methods or B.trainable_methods()
    peers = [] if a.no_peers or "diff" not in methods else list(B.PEERS)
    labels = [*B.REFERENCES, *methods, *peers]

    t_start = time.perf_counter()
    mem: dict[MemKey, dict[str, float]] = {}
    mem_keys = [(n, alloc) for n in mem_lengths for alloc in a.allocators]
    for n, alloc in mem_keys:  # memory first (a process's resident size is its own)
        mem[(n, alloc)] = got = B.step_peaks_mib(labels, n, a.threads, parallel=mem_parallel, shape=shape,
                                                 skip_failed=True, allocator=alloc)
        for lab in labels:
            peak = f"{got[lab]:8.1f} MiB" if lab in got else "failed"
            print(f"memory {lab:>12} @{n} ({alloc}): {peak}", flush=True)
    times: dict[int, dict[str, list[float]]] = {}
    for n in lengths:
        times[n] = B.run_worker("step_times", a.threads, labels=labels, length=n, rounds=rounds, shape=shape)
        for lab in labels:
            print(f"time {lab:>12} @{n}: median {statistics.median(times[n][lab]) * 1000:8.1f} ms, "
                  f"x stock {B.median_ratio(times[n][lab], times[n]['stock']):.2f}", flush=True)
    total = time.perf_counter() - t_start

    md = (
        f"### Training step{' peak memory' if a.memory_only else ''} (forward + backward + AdamW), "
        f"{B.model_description(shape)}, CPU: {B.cpu_summary()}\n\n"
        f"Machine: {B.machine_info(a.threads)}.\n"
        + (f"{a.note}\n" if a.note else "")
        + ("\n" if a.memory_only else
           f"\nTime: one worker process per length builds every configuration and times them round-robin ({rounds} "
           "rounds, one measurement each per round, order rotated each round, after 1 warm-up step each; a "
           "measurement is the mean of k consecutive steps, k chosen so that it lasts >= 0.3 s); each ratio is the "
           "median over rounds of the per-round ratio. ")
        + ("" if not mem_keys else
           f"Memory: one fresh process per (configuration, length), {mem_parallel} at a time, peak resident size "
           "of one step (kernel high-water mark reset right before it) above the resident size before it, after a "
           "16-token warm-up step that creates the optimizer state; allocators: glibc = glibc's default settings, "
           "mmap = `MALLOC_MMAP_THRESHOLD_=65536` (every block above 64 KiB its own mapping, returned when freed: "
           "the peak is what the step holds live, without heap fragmentation). ")
        + "Stock, stock x2 and the diffllama peer train their attention parameters, methods their own parameters; "
        "lambda = 0.5. `diffllama` is transformers' `DiffLlamaForCausalLM` of the same shape (a from-scratch DIFF "
        "model: same projection sizes, each head a DIFF head pair), a peer held to no target. "
        + (f"Targets: time <= {TIME_LIMIT} x stock x2 at every length for the two-map methods" if lengths else "")
        + (", " if lengths and mem_keys else "")
        + (f"peak memory at {MEM_TARGET_LENGTH} <= {MEM_LIMIT} x stock for every method" if mem_keys else "")
        + " (values over a target in bold with ✗). "
        "(2 maps) = the method computes two attention maps per head.\n\n"
        + table(times, mem, lengths, mem_keys, labels)
        + f"\nTotal benchmark wall time {total:.0f} s.\n"
    )
    print(md)
    if not a.quick:
        B.publish("step-memory" if a.memory_only else "step", md, ROOT)


if __name__ == "__main__":
    main()
