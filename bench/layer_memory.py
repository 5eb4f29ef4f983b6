"""Memory one decoder layer holds in a training step: the slope between a 1- and a 3-layer model of a shape.

For each configuration (``stock``, ``stock x2`` or a method, as in ``attndenoise.benchmark.build_model``): the
resident size after the forward and the peak during the backward, above the resident size before the forward, for a
1-layer and a 3-layer model; half the difference is the per-layer figure. The forward computes the logits of the
last position only and runs without a KV cache, so the figure is the layers' own. Run it with a fixed mmap
threshold, so that the resident size follows the tensors held live (see BENCHMARKS.md, training memory):

    MALLOC_MMAP_THRESHOLD_=65536 .venv/bin/python bench/layer_memory.py --length 4096 stock daa dint opamp

Prints one line per configuration; each configuration runs in this process one after the other (1 thread).
"""

from __future__ import annotations

import argparse
import gc

import torch

from attndenoise import benchmark as B


def per_layer(label: str, length: int, shape: str) -> tuple[float, float]:
    """(MiB per layer after the forward, MiB per layer at the backward's peak)."""
    got = []
    for layers in (1, 3):
        m = B.build_model(label, train=True, shape=shape, lambda_value=0.5, overrides={"num_hidden_layers": layers})
        ids = torch.randint(0, B.shape_config(shape)["vocab_size"], (1, length))
        gc.collect()
        before = B.rss_kib()
        loss = m(ids, logits_to_keep=1, use_cache=False).logits.sum()
        gc.collect()
        after = B.rss_kib()
        B.reset_peak_rss()
        loss.backward()
        got.append(((after - before) / 1024, (B.peak_rss_kib() - before) / 1024))
        del loss, m
        gc.collect()
    (f1, p1), (f3, p3) = got
    return (f3 - f1) / 2, (p3 - p1) / 2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("labels", nargs="+", help="stock, stock x2 or method names")
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--shape", choices=sorted(B.SHAPES), default="smollm2")
    a = ap.parse_args()
    torch.set_num_threads(1)
    for lab in a.labels:
        fwd, peak = per_layer(lab, a.length, a.shape)
        print(f"{lab:14s} after-forward {fwd:6.1f} MiB per layer, backward peak {peak:6.1f} MiB per layer", flush=True)


if __name__ == "__main__":
    main()
