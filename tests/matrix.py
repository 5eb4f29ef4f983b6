"""The checks every method file runs on every family (the test matrix of the core issue), written once.

Each ``check_*`` takes a patched (or stock) model and asserts against an independent reference: the same model on
unpadded inputs, a full forward instead of incremental decoding, the stock model's logits, a freshly loaded copy.
Method files keep their own parametrisation and add what is specific to them around these calls.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from models import inputs, tiny
from safetensors.torch import load_file, save_file

import attndenoise as ad


def randomize(model: torch.nn.Module, seed: int = 5) -> None:
    """Non-trivial method parameters and lambda != 0 (with anneal_steps=0, lambda = lambda_learn or the reparam)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in ad.method_modules(model).values():
            for name, p in m.named_parameters():
                if name.endswith("lambda_learn"):
                    p.copy_(0.2 + 0.6 * torch.rand(p.shape, generator=g))
                else:
                    p.add_(0.3 * torch.randn(p.shape, generator=g))


def method_config(variants: Mapping[str, tuple[str, dict[str, Any]]], variant: str, **extra: Any) -> ad.MethodConfig:
    """The config of a named test variant (``variants[variant] = (method, options)``) with ``extra`` on top."""
    name, opts = variants[variant]
    return ad.config_for(name, **{**opts, **extra})


def patched_model(variants: Mapping[str, tuple[str, dict[str, Any]]], family: str, variant: str, random: bool = True,
                  **extra: Any) -> torch.nn.Module:
    """A tiny ``family`` model with the variant applied at ``anneal_steps=0`` (lambda = its learned value), its
    method parameters randomized unless ``random`` is False."""
    model = tiny(family)
    ad.apply(model, method_config(variants, variant, anneal_steps=0, **extra))
    if random:
        randomize(model)
    return model


def left_pad(x: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``x`` with ``n`` pad tokens on the left -> ``(ids, attention_mask, position_ids)``, as ``generate`` builds
    them."""
    ids = torch.cat([torch.zeros(x.shape[0], n, dtype=x.dtype), x], 1)
    mask = torch.cat([torch.zeros(x.shape[0], n, dtype=torch.long), torch.ones_like(x)], 1)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, pos


def incremental_logits(model, ids: torch.Tensor, start: int, mask: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """Logits of a prefill of ``start`` tokens and then one token at a time through the KV cache (with a padding
    ``mask``, positions count real tokens only, as ``generate`` does: GPT-2's absolute positions need it)."""
    pos = None if mask is None else (mask.cumsum(-1) - 1).clamp(min=0)
    kw = {} if mask is None else {"attention_mask": mask[:, :start], "position_ids": pos[:, :start]}
    out = model(ids[:, :start], use_cache=True, **kw)
    steps, cache = [out.logits], out.past_key_values
    for t in range(start, ids.shape[1]):
        kw = {} if mask is None else {"attention_mask": mask[:, : t + 1], "position_ids": pos[:, t : t + 1]}
        out = model(ids[:, t : t + 1], cache=cache, use_cache=True, **kw)
        steps.append(out.logits)
        cache = out.past_key_values
    return torch.cat(steps, 1)


def check_causality(model: torch.nn.Module) -> None:
    """A prefix's logits equal the full sequence's logits on the prefix: no position sees a later one."""
    x = inputs(length=14)
    with torch.no_grad():
        full = model(x).logits
        prefix = model(x[:, :9]).logits
    torch.testing.assert_close(prefix, full[:, :9], atol=1e-5, rtol=1e-5)


def check_generate_cache_equals_no_cache(model: torch.nn.Module) -> None:
    """Greedy generation with the KV cache gives the tokens of generation without it, and prefill + one token at a
    time gives the logits of one full forward."""
    x = inputs(batch=1, length=8)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        with_cache = model.generate(x, use_cache=True, **kw)  # type: ignore[operator]
        without = model.generate(x, use_cache=False, **kw)  # type: ignore[operator]
        assert torch.equal(with_cache, without)
        full = model(with_cache).logits
        steps = incremental_logits(model, with_cache, 8)
    torch.testing.assert_close(steps, full, atol=2e-5, rtol=1e-4)


def check_left_padding(model: torch.nn.Module) -> None:
    """A left-padded row gives the logits of its example alone on its real tokens, its neighbour is untouched, and
    nothing is NaN."""
    long, short = inputs(batch=1, length=12, seed=3), inputs(batch=1, length=8, seed=4)
    ids_s, mask_s, pos_s = left_pad(short, 4)
    batch = torch.cat([long, ids_s])
    mask = torch.cat([torch.ones_like(long), mask_s])
    pos = torch.cat([torch.arange(12)[None], pos_s])
    with torch.no_grad():
        out = model(batch, attention_mask=mask, position_ids=pos).logits
        alone = model(short).logits
        alone_long = model(long).logits
    assert not torch.isnan(out).any()
    torch.testing.assert_close(out[1, 4:], alone[0], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(out[0], alone_long[0], atol=2e-5, rtol=1e-4)


def check_gradients_reach_only_method_parameters(model: torch.nn.Module, **forward: object) -> set[int]:
    """After one backward pass every method parameter has a non-zero gradient and no base parameter has one or is
    trainable. Returns the ids of the method parameters (for method-specific counts)."""
    model.train()
    x = inputs()
    model(x, labels=x, **forward).loss.backward()
    method_params = {id(p) for m in ad.method_modules(model).values() for p in m.parameters()}
    assert method_params
    for name, p in model.named_parameters():
        if id(p) in method_params:
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert not p.requires_grad and p.grad is None, name
    return method_params


def check_save_load_round_trip(model: torch.nn.Module, family: str, tmp_path: Path) -> torch.nn.Module:
    """``save`` writes the two adapter files and nothing else; ``load`` onto a stock model of the same family gives
    exactly the saved model's logits. Returns the loaded model."""
    x = inputs()
    with torch.no_grad():
        want = model(x).logits
    ad.save(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["attndenoise_config.json", "attndenoise_model.safetensors"]
    fresh = ad.load(tiny(family), tmp_path)
    with torch.no_grad():
        got = fresh(x).logits
    assert torch.equal(got, want)
    return fresh


def check_remove_restores_stock(family: str, config: ad.MethodConfig,
                                randomize_fn: Callable[[torch.nn.Module], None] = randomize) -> None:
    """A method with random parameters changes the logits; ``remove`` gives back the stock logits exactly, the stock
    ``requires_grad`` flags and no method parameter."""
    model = tiny(family)
    x = inputs()
    with torch.no_grad():
        ref = model(x).logits
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    ad.apply(model, config)
    randomize_fn(model)
    with torch.no_grad():
        assert (model(x).logits - ref).abs().max() > 1e-4  # the method does something
    ad.remove(model)
    with torch.no_grad():
        assert torch.equal(model(x).logits, ref)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads
    assert not any("attndenoise" in n for n, _ in model.named_parameters())


def rewrite_adapter(path: Path, edit: Callable[[dict[str, torch.Tensor]], object]) -> None:
    """Apply ``edit`` to the tensors of the adapter saved in ``path`` (to build mismatched adapters)."""
    f = path / "attndenoise_model.safetensors"
    tensors = load_file(str(f))
    edit(tensors)
    save_file(tensors, str(f))
