"""One rank of the FSDP2 test (tests/test_ecosystem.py runs it with torchrun, 2 processes, gloo on CPU).

argv: output folder. Applies DAA to the tiny Llama, randomises it as the single-process reference does, shards
every attention module, every decoder layer and the root with ``fully_shard``, checks the refusals, runs one AdamW
step on the same batch and saves the adapter (every rank calls ``save``; rank 0 writes).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from matrix import randomize
from models import inputs, tiny
from torch.distributed.fsdp import fully_shard

import attndenoise as ad


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model = tiny("llama")
    ad.apply(model, ad.config_for("daa", anneal_steps=0))
    randomize(model)
    for layer in model.model.layers:
        fully_shard(layer.self_attn)  # the attention class becomes FSDPLlamaAttention
        fully_shard(layer)
    fully_shard(model)
    report: dict[str, object] = {"attention_class": type(model.model.layers[0].self_attn).__name__}
    report["layers"] = sorted(ad.method_modules(model))
    report["summary"] = dict(ad.trainable_parameters(model))
    for name, call in (("apply", lambda: ad.apply(model, ad.config_for("daa"))), ("remove", lambda: ad.remove(model)),
                       ("merge", lambda: ad.merge(model))):
        try:
            call()
            report[name] = "accepted"
        except ad.ShardedModelError as e:
            report[name] = str(e)
        except ad.AlreadyAppliedError as e:
            report[name] = f"AlreadyAppliedError: {e}"
    stock = tiny("llama")
    fully_shard(stock)
    try:
        ad.apply(stock, ad.config_for("daa"))
        report["apply_sharded_stock"] = "accepted"
    except ad.ShardedModelError as e:
        report["apply_sharded_stock"] = str(e)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    x = inputs()
    model(input_ids=x, labels=x).loss.backward()  # FSDP averages the two ranks' (identical) gradients
    opt.step()
    ad.step(model)
    ad.save(model, out / "adapter")
    if rank == 0:
        (out / "report.json").write_text(json.dumps(report))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
