"""Training-step benchmark: forward+backward+AdamW time and peak memory, each method vs the stock model (same run).

Time: for each sequence length one worker process builds every configuration (stock, stock x2 and each method) and
times them round-robin, one measurement of each per round with the order rotated every round, after one warm-up step
each (a measurement is the mean of k consecutive steps, k chosen so that it lasts >= 0.3 s);
the table reports, per configuration, the median over rounds of its step time divided by stock's (or stock x2's)
step time *in the same round*, so load from other processes on a shared machine hits numerator and denominator
alike. ``stock x2`` is a stock model whose attention runs twice (the physical cost of two softmax maps), the
yardstick of the two-map methods.

Memory: every (configuration, length) runs in its own fresh process (two at a time): one 16-token warm-up step
(creates the optimizer state), then the peak resident size of one full step (kernel high-water mark ``VmHWM``, reset
right before the step) above the resident size right before it.

    python bench/bench_step.py [--lengths 512 1024 4096] [--methods daa dex ...] [--rounds 5] [--threads 1]
    python bench/bench_step.py --quick      # short lengths, 2 rounds; prints only

Writes bench/results/step.md and the ``<!-- bench:step -->`` section of BENCHMARKS.md.
Targets (issue): step time <= 1.15 x stock x2 at every length; peak memory at 4096 <= 1.25 x stock.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from attndenoise import benchmark as B

ROOT = Path(__file__).resolve().parent.parent

TIME_LIMIT = 1.15  # x stock x2
MEM_LIMIT = 1.25  # x stock, at MEM_TARGET_LENGTH
MEM_TARGET_LENGTH = 4096


def table(times: dict[int, dict[str, list[float]]], mem: dict[tuple[str, int], float], lengths: list[int],
          labels: list[str]) -> str:
    head = "| method | " + " | ".join(
        f"time/stock @{n} | time/(stock x2) @{n} | peak mem/stock @{n}" for n in lengths
    ) + " | targets met |"
    lines = [head, "|" + "---|" * (2 + 3 * len(lengths))]
    for lab in labels:
        cells, ok = [], []
        for n in lengths:
            t = times[n]
            r1, r2 = B.median_ratio(t[lab], t["stock"]), B.median_ratio(t[lab], t["stock x2"])
            rm = mem[(lab, n)] / mem[("stock", n)]
            limit_t = TIME_LIMIT if lab not in B.BASELINES else None
            limit_m = MEM_LIMIT if n == MEM_TARGET_LENGTH and lab not in B.BASELINES else None
            cells += [f"{r1:.2f}", B.fmt_ratio(r2, limit_t), B.fmt_ratio(rm, limit_m)]
            if limit_t is not None:
                ok.append(r2 <= limit_t)
            if limit_m is not None:
                ok.append(rm <= limit_m)
        verdict = "-" if lab in B.BASELINES else ("yes" if all(ok) else "**no**")
        lines.append(f"| {lab}{' (2 maps)' if lab in B.TWO_MAP else ''} | " + " | ".join(cells) + f" | {verdict} |")
    abs_lines = [
        f"- {n} tokens: stock {statistics.median(times[n]['stock']) * 1000:.0f} ms/step "
        f"(stock x2 {statistics.median(times[n]['stock x2']) * 1000:.0f} ms), "
        f"stock step peak {mem[('stock', n)]:.0f} MiB"
        for n in lengths
    ]
    return "\n".join(lines) + "\n\nAbsolute (medians):\n\n" + "\n".join(abs_lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=None, help="default 512 1024 4096 (quick: 128 256)")
    ap.add_argument("--methods", nargs="+", default=None, help="default: every trainable registered method")
    ap.add_argument("--rounds", type=int, default=None, help="timed rounds per length (default 5, quick 2)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads per worker (default 1: on a shared 2-core machine 2 threads measure the "
                         "scheduler more than the method)")
    ap.add_argument("--quick", action="store_true", help="short lengths, 2 rounds, print only (no files written)")
    ap.add_argument("--note", default="", help="a line added to the output header (e.g. machine load)")
    a = ap.parse_args()
    lengths = a.lengths or ([128, 256] if a.quick else [512, 1024, 4096])
    rounds = a.rounds or (2 if a.quick else 5)
    methods = a.methods or B.trainable_methods()
    labels = [*B.BASELINES, *methods]

    t_start = time.perf_counter()
    mem: dict[tuple[str, int], float] = {}
    for n in lengths:  # memory first, 2 processes at a time (a process's resident size is its own)
        for lab, peak in B.step_peaks_mib(labels, n, a.threads, parallel=2).items():
            mem[(lab, n)] = peak
            print(f"memory {lab:>12} @{n}: {peak:8.1f} MiB", flush=True)
    times: dict[int, dict[str, list[float]]] = {}
    for n in lengths:
        times[n] = B.run_worker("step_times", a.threads, labels=labels, length=n, rounds=rounds)
        for lab in labels:
            print(f"time {lab:>12} @{n}: median {statistics.median(times[n][lab]) * 1000:8.1f} ms, "
                  f"x stock {B.median_ratio(times[n][lab], times[n]['stock']):.2f}", flush=True)
    total = time.perf_counter() - t_start

    md = (
        f"### Training step (forward + backward + AdamW), {B.model_description()}, CPU\n\n"
        f"Machine: {B.machine_info(a.threads)}.\n"
        + (f"{a.note}\n" if a.note else "")
        + f"\nTime: one worker process per length builds every configuration and times them round-robin ({rounds} "
        "rounds, one measurement each per round, order rotated each round, after 1 warm-up step each; a measurement "
        "is the mean of k consecutive steps, k chosen so that it lasts >= 0.3 s); each ratio is the median over "
        "rounds of the per-round ratio. Memory: one fresh process per (configuration, length), peak resident size "
        "of one step (kernel high-water mark reset right before it) above the resident size before it, after a "
        "16-token warm-up step that creates the optimizer state. Stock and stock x2 train their attention "
        "projections, methods their own parameters; lambda = 0.5. "
        f"Targets: time <= {TIME_LIMIT} x stock x2 at every length, peak memory at {MEM_TARGET_LENGTH} <= "
        f"{MEM_LIMIT} x stock (values over a target in bold with ✗). (2 maps) = the method computes two attention "
        "maps per head.\n\n"
        + table(times, mem, lengths, labels)
        + f"\nTotal benchmark wall time {total:.0f} s.\n"
    )
    print(md)
    if not a.quick:
        B.publish("step", md, ROOT)


if __name__ == "__main__":
    main()
