"""The core test matrix (issue: core library) for DAA, DiffQ, DiffK, DiffV and DEX on every supported family.

Every numeric check compares against an independent reference: the stock model (identity, remove, causality,
cache), explicit maps built in tests/reference.py from what the stock model computes, or a stock model whose
projection weights were changed so that it computes the SPEC formula for us (DiffQ/K/V).
"""

from __future__ import annotations

import json
from functools import partial

import pytest
import torch
from matrix import (
    check_causality,
    check_generate_cache_equals_no_cache,
    check_gradients_reach_only_method_parameters,
    check_left_padding,
    check_remove_restores_stock,
    check_save_load_round_trip,
    method_config,
    patched_model,
    rewrite_adapter,
)
from models import FAMILIES, VOCAB, inputs, tiny
from reference import (
    apply_map,
    capture,
    explicit_map,
    heads_last,
    patched_out,
    rope,
    set_projection,
)

import attndenoise as ad

# (method, options): the variants every family is tested with
VARIANTS = {
    "daa": ("daa", {}),
    "daa_post": ("daa", {"where": "post_rope"}),
    "diffq": ("diffq", {}),
    "diffk": ("diffk", {}),
    "diffv": ("diffv", {}),
    "dex": ("dex", {}),
    "dex_shared": ("dex", {"shared": True, "lambda_granularity": "layer"}),
}
ATOL = 2e-5


make = partial(method_config, VARIANTS)
patched = partial(patched_model, VARIANTS)


#: every variant: identity and the SPEC reference
FULL = [(f, v) for f in FAMILIES for v in VARIANTS]
#: one variant per method for the behavioural checks (option variants change no cache / padding / io code path)
MATRIX = [(f, v) for f in FAMILIES for v in ("daa", "diffq", "diffk", "diffv", "dex")]


# -- identity at init ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family,variant", FULL)
@pytest.mark.parametrize("anneal", [0, 100])
def test_identity_at_init(family: str, variant: str, anneal: int) -> None:
    model = tiny(family)
    x = inputs()
    with torch.no_grad():
        ref = model(x).logits
        ad.apply(model, make(variant, anneal_steps=anneal))
        out = model(x).logits
    assert (out - ref).abs().max() < 1e-5


# -- fused output == explicit SPEC formulas -----------------------------------------------------------------------


def expected_output(family: str, variant: str, stock, model, x):  # type: ignore[no-untyped-def]
    """The SPEC formula for the last layer, computed from the stock model and the method's parameters."""
    layer = 1
    c = capture(stock, x, layer)
    m = ad.method_modules(model)[layer]
    lam = m.lam.lambda_learn.detach().double()
    attn = [a for a in stock.modules() if type(a).__name__.endswith("Attention")][layer]

    def maps(q, k):  # type: ignore[no-untyped-def]
        return apply_map(explicit_map(q, k, c.mask, c.scaling, c.softcap), c.v)

    name = VARIANTS[variant][0]
    lam4 = lam.view(1, -1, 1, 1)
    if name == "daa":
        w = m.weight.detach()
        if VARIANTS[variant][1].get("where") == "post_rope":
            q2 = c.q @ w
        else:
            q2 = rope(attn, c.q_pre @ w, c.pos)
        return heads_last(maps(c.q, c.k) - lam4 * maps(q2, c.k))
    if name in ("diffq", "diffk"):
        wd = m.weight.detach()
        which = name[-1]
        other = capture(set_projection(stock, layer, which, lambda w: w @ wd.T), x, layer)
        if which == "q":
            return heads_last(maps(c.q, c.k) - lam4 * maps(other.q, c.k))
        return heads_last(maps(c.q, c.k) - lam4 * maps(c.q, other.k))
    if name == "diffv":
        wd = m.weight.detach()
        d = attn.head_dim
        rows = lam.float().repeat_interleave(d)[:, None] if lam.numel() > 1 else lam.float()
        other = capture(set_projection(stock, layer, "v", lambda w: w - rows * (w @ wd.T)), x, layer)
        return other.out
    if name == "dex":
        b, n, hd = c.out.shape
        d = attn.head_dim
        o = c.out.double().view(b, n, hd // d, d)
        w = m.weight.detach().double()
        ext = torch.einsum("bnhd,hde->bnhe", o, w.expand(hd // d, d, d))
        return (o - lam.view(1, 1, -1, 1) * ext).reshape(b, n, hd)
    raise AssertionError(variant)


@pytest.mark.parametrize("family,variant", FULL)
def test_fused_matches_spec_reference(family: str, variant: str) -> None:
    stock = tiny(family)
    model = patched(family, variant, layers=[1])
    x = inputs()
    want = expected_output(family, variant, stock, model, x)
    got = patched_out(model, x, 1)
    assert got.shape == want.shape
    torch.testing.assert_close(got.double(), want.double(), atol=ATOL, rtol=1e-4)
    # the reference path (explicit maps) computes the same thing
    with ad.reference_mode(model):
        got_eager = patched_out(model, x, 1)
    torch.testing.assert_close(got_eager.double(), want.double(), atol=ATOL, rtol=1e-4)


# -- causality, cache, padding ------------------------------------------------------------------------------------


@pytest.mark.parametrize("family,variant", MATRIX)
def test_causality(family: str, variant: str) -> None:
    check_causality(patched(family, variant))


@pytest.mark.parametrize("family,variant", MATRIX)
def test_generate_cache_equals_no_cache(family: str, variant: str) -> None:
    check_generate_cache_equals_no_cache(patched(family, variant))


@pytest.mark.parametrize("family,variant", MATRIX)
def test_left_padding(family: str, variant: str) -> None:
    check_left_padding(patched(family, variant))


# -- training, saving, merging, removing -------------------------------------------------------------------------


@pytest.mark.parametrize("family,variant", MATRIX)
def test_gradients_reach_only_method_parameters(family: str, variant: str) -> None:
    check_gradients_reach_only_method_parameters(patched(family, variant))


@pytest.mark.parametrize("family,variant", MATRIX)
def test_save_load_round_trip(family: str, variant: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    model = patched(family, variant)
    ad.step(model, 7)
    fresh = check_save_load_round_trip(model, family, tmp_path)
    assert all(int(m.lam.step) == 7 for m in ad.method_modules(fresh).values())


@pytest.mark.parametrize("family,variant", MATRIX)
def test_remove_restores_stock(family: str, variant: str) -> None:
    check_remove_restores_stock(family, make(variant, anneal_steps=0))


MERGEABLE = ["diffv", "dex", "dex_shared"]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("variant", MERGEABLE)
def test_merge_equals_unmerged(family: str, variant: str) -> None:
    model = patched(family, variant)
    x = inputs()
    with torch.no_grad():
        want = model(x).logits
    ad.merge(model)
    assert not any("attndenoise" in n for n, _ in model.named_parameters())
    with torch.no_grad():
        got = model(x).logits
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("variant", ["daa", "diffq", "diffk"])
def test_merge_refused_for_two_map_methods(variant: str) -> None:
    model = patched("llama", variant)
    with pytest.raises(ad.NotMergeableError, match="mergeable methods: .*dex.*diffv"):
        ad.merge(model)


# -- adapter files that do not fit ---------------------------------------------------------------------------------


def _saved(tmp_path, family="llama", variant="daa"):  # type: ignore[no-untyped-def]
    model = patched(family, variant)
    ad.save(model, tmp_path)
    return tmp_path


def test_load_rejects_mis_shaped_tensor(tmp_path) -> None:  # type: ignore[no-untyped-def]
    d = _saved(tmp_path)
    rewrite_adapter(d, lambda t: t.__setitem__("layers.1.weight", torch.zeros(4, 8, 9)))
    model = tiny("llama")
    with pytest.raises(ad.AdapterLoadError, match=r"layers\.1\.weight has shape \(4, 8, 9\)"):
        ad.load(model, d)
    assert ad.patch.state_of(model) is None  # nothing half-applied


def test_load_rejects_missing_and_extra_tensors(tmp_path) -> None:  # type: ignore[no-untyped-def]
    d = _saved(tmp_path)
    rewrite_adapter(d, lambda t: t.pop("layers.0.lam.lambda_learn"))
    with pytest.raises(ad.AdapterLoadError, match=r"missing tensor\(s\) layers\.0\.lam\.lambda_learn"):
        ad.load(tiny("llama"), d)
    d2 = _saved(tmp_path / "b")
    rewrite_adapter(d2, lambda t: t.__setitem__("layers.0.bogus", torch.zeros(1)))
    with pytest.raises(ad.AdapterLoadError, match=r"unexpected tensor\(s\) layers\.0\.bogus"):
        ad.load(tiny("llama"), d2)


def test_load_rejects_other_architecture(tmp_path) -> None:  # type: ignore[no-untyped-def]
    d = _saved(tmp_path, family="llama")
    msg = "another base architecture.*family: adapter 'llama' vs model 'qwen2'"
    with pytest.raises(ad.AdapterLoadError, match=msg):
        ad.load(tiny("qwen2"), d)
    d2 = _saved(tmp_path / "g", family="gpt2")
    with pytest.raises(ad.AdapterLoadError, match="num_kv_heads"):
        ad.load(tiny("llama"), d2)


def test_adapter_config_is_plain_json(tmp_path) -> None:  # type: ignore[no-untyped-def]
    d = _saved(tmp_path, variant="dex")
    meta = json.loads((d / "attndenoise_config.json").read_text())
    assert meta["config"]["method"] == "dex" and meta["base"]["family"] == "llama"


# -- misc API behaviour --------------------------------------------------------------------------------------------


def test_apply_twice_is_refused() -> None:
    model = patched("llama", "daa")
    with pytest.raises(ad.AlreadyAppliedError, match="already has method 'daa'"):
        ad.apply(model, ad.config_for("dex"))


def test_unsupported_model_names_families() -> None:
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    model = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1,
                                             num_attention_heads=4, intermediate_size=64))
    with pytest.raises(ad.UnsupportedModelError, match="supported families: llama, qwen2, .*gpt2"):
        ad.apply(model, ad.config_for("daa"))


def test_layer_selection() -> None:
    model = tiny("llama")
    ad.apply(model, ad.config_for("dex", layers="every:2"))
    assert list(ad.method_modules(model)) == [0]
    ad.remove(model)
    ad.apply(model, ad.config_for("dex", layers=[-1]))
    assert list(ad.method_modules(model)) == [1]


def test_diffk_caches_its_second_keys() -> None:
    model = patched("llama", "diffk")
    out = model(inputs(batch=1, length=5), use_cache=True)
    keys = out.past_key_values.layers[0].keys
    assert keys.shape[-1] == 2 * 8  # K and K2 side by side, one cache entry per position
    assert keys.shape[-2] == 5


def test_output_attentions_returns_combined_map() -> None:
    """The map returned with output_attentions is the method's effective map A1 - lambda A2 (SPEC 9)."""
    stock = tiny("llama")
    model = patched("llama", "daa_post", layers=[1])
    x = inputs()
    c = capture(stock, x, 1)
    m = ad.method_modules(model)[1]
    lam = m.lam.lambda_learn.detach().double().view(1, -1, 1, 1)
    want = explicit_map(c.q, c.k, None, c.scaling) - lam * explicit_map(c.q @ m.weight.detach(), c.k, None, c.scaling)
    with torch.no_grad():
        att = model(x, output_attentions=True).attentions
    torch.testing.assert_close(att[1].double(), want, atol=1e-5, rtol=1e-4)
