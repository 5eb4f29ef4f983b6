"""Training-step benchmark: forward+backward time and peak memory, each method vs the stock model (same run).

Every configuration runs in its own subprocess, so peak RSS (``ru_maxrss``) belongs to that configuration alone;
the table reports the step's peak memory above the process's footprint right before the step, and all figures as
ratios to the stock model measured in the same run. ``stock x2`` is a stock model whose attention runs twice (the
physical cost of two softmax maps), the yardstick for two-map methods.

    python bench/bench_step.py [--lengths 512 1024 4096] [--methods daa dex ...] [--steps 3]

Writes bench/results/step.md and the section between the markers in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODEL = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
             intermediate_size=688, vocab_size=1024, max_position_embeddings=8192)


def _rss_kib() -> int:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    import os

    return pages * os.sysconf("SC_PAGE_SIZE") // 1024


def worker(method: str, length: int, steps: int) -> dict:
    """One configuration: build the model, run ``steps`` timed fwd+bwd steps after measuring the first."""
    import resource

    import torch
    from transformers import AttentionInterface, LlamaConfig, LlamaForCausalLM
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    import attndenoise as ad

    torch.manual_seed(0)
    torch.set_num_threads(2)
    model = LlamaForCausalLM(LlamaConfig(**MODEL))
    if method == "stock x2":
        def twice(module, q, k, v, mask, **kw):  # type: ignore[no-untyped-def]
            o1, _ = sdpa_attention_forward(module, q, k, v, mask, **kw)
            o2, _ = sdpa_attention_forward(module, q, k, v, mask, **kw)
            return 0.5 * (o1 + o2), None

        AttentionInterface.register("sdpa_twice", twice)
        AttentionMaskInterface.register("sdpa_twice", sdpa_mask)
        model.set_attn_implementation("sdpa_twice")
    elif method != "stock":
        ad.apply(model, ad.config_for(method, anneal_steps=0))
        with torch.no_grad():  # lambda != 0 so no term is skipped by accident
            for m in ad.method_modules(model).values():
                for name, p in m.named_parameters():
                    if name.endswith("lambda_learn"):
                        p.fill_(0.5)
    params = [p for p in model.parameters() if p.requires_grad]
    if method in ("stock", "stock x2"):  # stock baselines train the attention projections
        for p in model.parameters():
            p.requires_grad_(False)
        params = []
        for layer in model.model.layers:
            for p in layer.self_attn.parameters():
                p.requires_grad_(True)
                params.append(p)
    opt = torch.optim.AdamW(params, lr=1e-4)
    model.train()
    x = torch.randint(0, MODEL["vocab_size"], (1, length))

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        model(x, labels=x).loss.backward()
        opt.step()

    base = _rss_kib()
    step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return {"method": method, "length": length, "time_s": statistics.median(times), "peak_mib": peak / 1024}


def run_one(method: str, length: int, steps: int) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--worker", method, str(length), str(steps)],
        check=True, capture_output=True, text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(rows: list[dict], lengths: list[int], methods: list[str]) -> str:
    by = {(r["method"], r["length"]): r for r in rows}
    head = "| method | " + " | ".join(
        f"time/stock @{n} | time/(stock x2) @{n} | peak mem/stock @{n}" for n in lengths
    ) + " |"
    lines = [head, "|" + "---|" * (1 + 3 * len(lengths))]
    for m in ["stock", "stock x2", *methods]:
        cells = []
        for n in lengths:
            r, s, s2 = by[(m, n)], by[("stock", n)], by[("stock x2", n)]
            cells += [f"{r['time_s'] / s['time_s']:.2f}", f"{r['time_s'] / s2['time_s']:.2f}",
                      f"{r['peak_mib'] / s['peak_mib']:.2f}"]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    abs_line = "Stock absolute: " + ", ".join(
        f"{n} tokens {by[('stock', n)]['time_s'] * 1000:.0f} ms/step, {by[('stock', n)]['peak_mib']:.0f} MiB peak"
        for n in lengths
    )
    return "\n".join(lines) + "\n\n" + abs_line + "\n"


def write_section(name: str, body: str) -> None:
    """Replace the section between ``<!-- bench:name -->`` markers in BENCHMARKS.md (append if absent)."""
    path = ROOT / "BENCHMARKS.md"
    text = path.read_text() if path.exists() else "# Benchmarks\n\nGenerated by the scripts in bench/.\n"
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    block = f"{start}\n{body}\n{end}"
    if start in text:
        a, b = text.index(start), text.index(end) + len(end)
        text = text[:a] + block + text[b:]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 4096])
    ap.add_argument("--methods", nargs="+", default=None, help="default: every trainable registered method")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(worker(a.worker[0], int(a.worker[1]), int(a.worker[2]))))
        return
    import attndenoise as ad

    methods = a.methods or [n for n, c in ad.METHODS.items() if c.trainable]
    rows = []
    for n in a.lengths:
        for m in ["stock", "stock x2", *methods]:
            r = run_one(m, n, a.steps)
            print(f"{m:>12} @{n}: {r['time_s'] * 1000:8.1f} ms  {r['peak_mib']:8.1f} MiB", flush=True)
            rows.append(r)
    md = (
        f"### Training step (forward + backward + AdamW), tiny Llama {MODEL['hidden_size']}d x "
        f"{MODEL['num_hidden_layers']} layers, {MODEL['num_attention_heads']} heads / "
        f"{MODEL['num_key_value_heads']} kv heads, batch 1, CPU ({platform.machine()}, 2 threads), "
        f"median of {a.steps} steps\n\n" + table(rows, a.lengths, methods)
    )
    (ROOT / "bench" / "results").mkdir(parents=True, exist_ok=True)
    (ROOT / "bench" / "results" / "step.md").write_text(md)
    write_section("step", md)
    print(md)


if __name__ == "__main__":
    main()
