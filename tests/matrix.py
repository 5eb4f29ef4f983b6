"""The test matrix: one table of cases, run over every family, and the checks it runs, written once.

``CASES`` is the table, in the shape of peft's ``TEST_CASES``: a row is a method with options. What a row *is*
(trainable, driven by the lambda schedule, mergeable) is read from the library's flags (the properties of
:class:`Case`), never from lists kept here; the few facts no library flag states are row options, marked "row
option" on :class:`Case`. tests/test_matrix.py runs every common check over ``FAMILIES x CASES`` and fails when a
registered method has no row. The per-method test files take their rows from here and keep only what is specific
to a method: its formula against an independent reference, what it caches, its own loaders and options.

Adding a method: the method file in the library, then its rows here (its default options first: :func:`plain` and
other test files use that row) and its formula in its test file.

Each ``check_*`` takes a patched (or stock) model and asserts against an independent reference: the same model on
unpadded inputs, a full forward instead of incremental decoding, the stock model's logits, a freshly loaded copy,
the method's formula computed from the stock model (tests/reference.py).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from models import inputs, peaky, tiny
from reference import patched_out
from safetensors.torch import load_file, save_file

import attndenoise as ad
from attndenoise import registry

ATOL = 2e-5


@dataclass(frozen=True)
class Case:
    """One row of the matrix: ``method`` with ``options`` (on top of the method's defaults)."""

    id: str
    method: str
    options: Mapping[str, Any] = field(default_factory=dict)
    #: row option: extra options under which the row is the stock model at init (SRA: zero thresholds; the
    #: re-parameterised lambda starts at ``lambda_init``, so only a warm-up from 0 makes it the stock model); ``None``:
    #: not the stock model at init, by design (DIFF's from-scratch options rescale by ``1 - lambda_init``)
    identity: Mapping[str, Any] | None = field(default_factory=dict)
    #: row option: no position sees a later one, so a prefix's logits are the full sequence's and decoding token by
    #: token through the KV cache gives one full forward (False: DINT's printed column mean averages over later
    #: rows; SRA's prefill edit depends on the prompt length and decoding steps are stock by design)
    causal: bool = True
    #: row option: generation with a static (pre-allocated) cache works (False: DINT's running state, written into
    #: the storage a dynamic cache returns, refuses static caches)
    static_cache: bool = True
    #: row option: the model of a family the row runs on (SRA edits only peaky maps: on the near-uniform maps of a
    #: random model it selects no row, and every check would pass vacuously)
    model: Callable[[str], torch.nn.Module] = tiny

    # -- traits, from the library's flags ------------------------------------------------------------------------
    @property
    def config_cls(self) -> type[ad.MethodConfig]:
        return registry.config_class(self.method)

    @property
    def trainable(self) -> bool:
        return self.config_cls.trainable

    @property
    def lambda_schedule(self) -> bool:
        return self.config_cls.uses_lambda_schedule

    @property
    def mergeable(self) -> bool:
        return self.method in registry.mergeable_methods()

    def config(self, **extra: Any) -> ad.MethodConfig:
        """The row's validated config with ``extra`` on top."""
        return ad.config_for(self.method, **{**self.options, **extra})

    def __str__(self) -> str:
        return self.id


#: the table. Option rows are there because they change a code path (another cache layout, another lambda, another
#: way to form the second map), so every common check runs on them too.
CASES: list[Case] = [
    Case("daa", "daa"),
    Case("daa_post", "daa", {"where": "post_rope"}),
    Case("diffq", "diffq"),
    Case("diffk", "diffk"),
    Case("diffv", "diffv"),
    Case("dex", "dex"),
    Case("dex_shared", "dex", {"shared": True, "lambda_granularity": "layer"}),
    Case("diff", "diff"),
    Case("diff_reparam", "diff", {"lambda_reparam": True}, identity={"anneal_steps": 100}),
    Case("diff_norm", "diff", {"head_norm": True}, identity=None),
    Case("diff_scratch", "diff", {"pairing": True, "head_norm": True, "lambda_reparam": True, "lambda_init": "depth"},
         identity=None),
    Case("dint", "dint", static_cache=False),
    Case("dint_reparam", "dint", {"lambda_reparam": True}, identity={"anneal_steps": 100}, static_cache=False),
    Case("dint_noncausal", "dint", {"causal_integral": False}, causal=False, static_cache=False),
    Case("lowrank", "lowrank_dint", {"rank": 4}, static_cache=False),
    Case("lowrank_plain", "lowrank_dint", {"rank": 4, "temperature": "sqrt_d", "rotary": False}, static_cache=False),
    Case("opamp", "opamp"),
    Case("opamp_rerun", "opamp", {"cache_adapted_keys": False}),  # the authors' re-run of the key adapters
    Case("opamp_repeated", "opamp", {"key_adapters": "repeated"}),  # the authors' Qwen2 key layout
    Case("opamp_small", "opamp", {"layers": "every:2", "adapter_dim": 8, "cmrr": 4.0}),
    Case("sra", "sra", {"b": 1, "t": 2}, identity={"alpha_inter": 0.0, "alpha_outer": 0.0}, causal=False,
         model=peaky),
]
CASE: dict[str, Case] = {c.id: c for c in CASES}


def cases(*methods: str) -> list[Case]:
    """The rows of ``methods``, in table order."""
    return [c for c in CASES if c.method in methods]


def plain(method: str) -> Case:
    """The first row of ``method``: its default options, or the few a tiny model needs for the method to act."""
    return next(c for c in CASES if c.method == method)


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


def method_config(case: Case | str, **extra: Any) -> ad.MethodConfig:
    """The config of a row (or of its id) with ``extra`` on top."""
    return (CASE[case] if isinstance(case, str) else case).config(**extra)


def patched_model(family: str, case: Case | str, random: bool = True, **extra: Any) -> torch.nn.Module:
    """The row's model of ``family`` with the row applied at ``anneal_steps=0`` (lambda = its learned value), its
    method parameters randomized unless ``random`` is False."""
    case = CASE[case] if isinstance(case, str) else case
    model = case.model(family)
    ad.apply(model, case.config(**{"anneal_steps": 0, **extra}))
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
    time gives the logits of one full forward, after a prefill of 8 tokens and of 3 (8 + 6 tokens run past the
    sliding windows (6) of the tiny Mistral / Gemma models, whose cache drops old positions)."""
    x = inputs(batch=1, length=8)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        with_cache = model.generate(x, use_cache=True, **kw)  # type: ignore[operator]
        without = model.generate(x, use_cache=False, **kw)  # type: ignore[operator]
        assert torch.equal(with_cache, without)
        full = model(with_cache).logits
        steps = incremental_logits(model, with_cache, 8)
        chunked = incremental_logits(model, with_cache, 3)  # short prefill, then 11 single steps
    torch.testing.assert_close(steps, full, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(chunked, full, atol=2e-5, rtol=1e-4)


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


def check_save_load_round_trip(model: torch.nn.Module, family: str, tmp_path: Path,
                               build: Callable[[str], torch.nn.Module] = tiny) -> torch.nn.Module:
    """``save`` writes the two adapter files and nothing else; ``load`` onto a stock model of the same family
    (``build(family)``) gives exactly the saved model's logits on the same layers. Returns the loaded model."""
    x = inputs()
    with torch.no_grad():
        want = model(x).logits
    ad.save(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["attndenoise_config.json", "attndenoise_model.safetensors"]
    fresh = ad.load(build(family), tmp_path)
    with torch.no_grad():
        got = fresh(x).logits
    assert torch.equal(got, want)
    assert list(ad.method_modules(fresh)) == list(ad.method_modules(model))
    return fresh


def check_remove_restores_stock(family: str, config: ad.MethodConfig,
                                randomize_fn: Callable[[torch.nn.Module], None] = randomize,
                                build: Callable[[str], torch.nn.Module] = tiny) -> None:
    """A method with random parameters changes the logits; ``remove`` gives back the stock logits exactly, the stock
    ``requires_grad`` flags and no method parameter."""
    model = build(family)
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


def check_matches_reference(model: torch.nn.Module, x: torch.Tensor, want: torch.Tensor, layer: int = 1) -> None:
    """Layer ``layer``'s attention output (before the output projection) equals ``want``, the method's formula
    computed independently from the stock model, on the fused path and on the explicit-map reference path."""
    got = patched_out(model, x, layer)
    assert got.shape == want.shape
    torch.testing.assert_close(got.double(), want.double(), atol=ATOL, rtol=1e-4)
    with ad.reference_mode(model):
        got_eager = patched_out(model, x, layer)
    torch.testing.assert_close(got_eager.double(), want.double(), atol=ATOL, rtol=1e-4)


def rewrite_adapter(path: Path, edit: Callable[[dict[str, torch.Tensor]], object]) -> None:
    """Apply ``edit`` to the tensors of the adapter saved in ``path`` (to build mismatched adapters)."""
    f = path / "attndenoise_model.safetensors"
    tensors = load_file(str(f))
    edit(tensors)
    save_file(tensors, str(f))
