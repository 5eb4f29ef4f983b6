"""DINT and low-rank DINT (docs/methods.md, sections DINT and Low-rank DINT; *DINT Transformer*, arXiv 2501.17486,
and the slides *Low rank attention denoising*, Okhotnikov, MIPT 2025) on every supported family.

The common checks (identity at init, causality, cache, padding, gradients, save / load, remove) run for the DINT
rows of the table in tests/test_matrix.py. Independent references here: explicit float64 maps
``lambda A3 + A1 - lambda A2`` built from what a stock model computes, with ``A3`` written out as the causal row
mean of ``A1`` (or the printed column mean for ``causal_integral=False``). The decoding state is checked against
full recomputation on sliding-window families (windows of 6, sequences longer than that), with left padding, cache
cropping, beam search and a 16-bit cache.
"""

from __future__ import annotations

import pytest
import torch
from matrix import (
    ATOL,
    Case,
    cases,
    check_matches_reference,
    incremental_logits,
    left_pad,
    method_config,
    patched_model,
    rewrite_adapter,
)
from models import FAMILIES, inputs, tiny
from reference import apply_map, attention_modules, capture, explicit_map, heads_last, patched_out, rope, with_qk
from test_diff import lambda_of
from transformers import DynamicCache

import attndenoise as ad

# -- the low-rank second map ----------------------------------------------------------------------------------


def test_lowrank_second_map_starts_uniform() -> None:
    """W_up = 0 makes Q2 = K2 = 0, so A2 is the uniform causal map and O2 the running mean of V."""
    model = tiny("llama")
    ad.apply(model, method_config("lowrank", anneal_steps=0))
    m = ad.method_modules(model)[0]
    assert torch.equal(m.q_up, torch.zeros(32, 4)) and torch.equal(m.k_up, torch.zeros(16, 4))
    assert m.q_down.abs().max() <= 32**-0.5 and m.q_down.std() > 0
    with torch.no_grad():
        m.lam.lambda_learn.fill_(0.5)
    stock = tiny("llama")
    x = inputs()
    c = capture(stock, x, 0)
    v = c.v.repeat_interleave(2, dim=1).double()
    o2 = v.cumsum(-2) / torch.arange(1, 13).view(1, 1, -1, 1)  # uniform causal map applied to V
    o1 = apply_map(explicit_map(c.q, c.k, None, c.scaling), c.v)
    a3v = o1.cumsum(-2) / torch.arange(1, 13).view(1, 1, -1, 1)
    want = heads_last(0.5 * a3v + o1 - 0.5 * o2)
    torch.testing.assert_close(patched_out(model, x, 0).double(), want, atol=ATOL, rtol=1e-4)


# -- fused output == the formula ------------------------------------------------------------------------------------


def expected_output(stock, model, x, case: Case, layer: int = 1) -> torch.Tensor:  # type: ignore[no-untyped-def]
    name, opts = case.method, case.options
    c = capture(stock, x, layer)
    m = ad.method_modules(model)[layer]
    lam = lambda_of(m).view(1, -1, 1, 1)
    attn = attention_modules(stock)[layer]
    a1 = explicit_map(c.q, c.k, c.mask, c.scaling, c.softcap)
    if name == "dint":
        pr = m.proj2
        other = capture(with_qk(stock, layer, pr.q_weight, pr.q_bias, pr.k_weight, pr.k_bias), x, layer)
        a2 = explicit_map(other.q, other.k, c.mask, c.scaling, c.softcap)
    else:
        b, n, _ = c.hidden.shape
        d = attn.head_dim
        q2 = (c.hidden.double() @ m.q_down.double().T @ m.q_up.double().T).view(b, n, -1, d).transpose(1, 2)
        k2 = (c.hidden.double() @ m.k_down.double().T @ m.k_up.double().T).view(b, n, -1, d).transpose(1, 2)
        if opts.get("rotary", True):
            q2, k2 = rope(attn, q2, c.pos), rope(attn, k2, c.pos)
        scale2 = c.scaling * (9.0 if opts.get("temperature", "d81") == "d81" else 1.0)
        a2 = explicit_map(q2, k2, c.mask, scale2, c.softcap)
    rows = a1.shape[-2]
    if opts.get("causal_integral", True):
        a3 = a1.cumsum(-2) / torch.arange(1, rows + 1, dtype=a1.dtype).view(1, 1, -1, 1)  # causal row mean
    else:
        a3 = a1.mean(-2, keepdim=True).expand_as(a1)  # the printed column mean, repeated over rows
    return heads_last(apply_map(lam * a3 + a1 - lam * a2, c.v))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("case", cases("dint", "lowrank_dint"), ids=str)
def test_fused_matches_reference(family: str, case: Case) -> None:
    stock = tiny(family)
    model = patched_model(family, case, layers=[1])
    x = inputs()
    check_matches_reference(model, x, expected_output(stock, model, x, case))


@pytest.mark.parametrize("variant", ["dint", "dint_noncausal"])
def test_output_attentions_is_the_combined_map(variant: str) -> None:
    stock = tiny("qwen2")
    model = patched_model("qwen2", variant, layers=[1])
    x = inputs()
    c = capture(stock, x, 1)
    m = ad.method_modules(model)[1]
    pr = m.proj2
    c2 = capture(with_qk(stock, 1, pr.q_weight, pr.q_bias, pr.k_weight, pr.k_bias), x, 1)
    lam = lambda_of(m).view(1, -1, 1, 1)
    a1, a2 = explicit_map(c.q, c.k, None, c.scaling), explicit_map(c2.q, c2.k, None, c.scaling)
    if variant == "dint":
        a3 = a1.cumsum(-2) / torch.arange(1, 13, dtype=a1.dtype).view(1, 1, -1, 1)
    else:
        a3 = a1.mean(-2, keepdim=True).expand_as(a1)
    with torch.no_grad():
        att = model(x, output_attentions=True, use_cache=False).attentions
    torch.testing.assert_close(att[1].double(), lam * a3 + a1 - lam * a2, atol=1e-5, rtol=1e-4)


# -- the decoding state --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_left_padded_batch_decodes_like_each_example_alone(family: str) -> None:
    """The valid-position count travels with the cache: padded rows never enter sum or count while decoding."""
    model = patched_model(family, "dint")
    long, short = inputs(batch=1, length=12, seed=3), inputs(batch=1, length=7, seed=4)
    ids_s, mask_s, _ = left_pad(short, 5)
    batch, mask = torch.cat([long, ids_s]), torch.cat([torch.ones_like(long), mask_s])
    with torch.no_grad():
        steps = incremental_logits(model, batch, 4, mask)
        alone_long = model(long).logits
        alone_short = model(short).logits
        gen = model.generate(batch, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
        gen_short = model.generate(short, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert not torch.isnan(steps).any()
    torch.testing.assert_close(steps[0], alone_long[0], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(steps[1, 5:], alone_short[0], atol=2e-5, rtol=1e-4)
    assert torch.equal(gen[1, 5:], gen_short[0])


def test_state_rides_in_the_value_cache() -> None:
    model = patched_model("llama", "dint")
    out = model(inputs(batch=1, length=5), use_cache=True)
    layer = out.past_key_values.layers[0]
    assert layer.keys.shape == (1, 2, 5, 16)  # K and K2
    # V (8), prefix sum of O1 for the 2 query heads of each kv head (16), count (1), padding to a multiple of 8
    assert layer.values.shape == (1, 2, 5, 32)
    assert layer.values[0, :, :, 8 + 16].tolist() == [[1.0, 2.0, 3.0, 4.0, 5.0]] * 2


def test_cache_crop_then_continue() -> None:
    model = patched_model("llama", "lowrank")
    x = inputs(batch=2, length=14)
    with torch.no_grad():
        full = model(x).logits
        cache = DynamicCache(config=model.config)
        model(x[:, :10], cache=cache, use_cache=True)
        cache.crop(-3)  # back to 7 positions, as assisted decoding does after rejected tokens
        got = model(x[:, 7:], cache=cache, use_cache=True).logits
    torch.testing.assert_close(got, full[:, 7:], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_beam_search_cache_equals_no_cache(family: str) -> None:
    model = patched_model(family, "dint")
    x = inputs(batch=1, length=7)
    kw = dict(max_new_tokens=6, do_sample=False, num_beams=3, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(model.generate(x, use_cache=True, **kw), model.generate(x, use_cache=False, **kw))


def test_half_precision_cache_keeps_a_float32_state() -> None:
    """bf16 cache: the prefix sum and count are stored bit for bit as float32 (a bf16 count is inexact past 256)."""
    model = patched_model("llama", "dint").to(torch.bfloat16)
    x = inputs(batch=1, length=301)
    with torch.no_grad():
        out = model(x[:, :300], use_cache=True)
        step = model(x[:, 300:], cache=out.past_key_values, use_cache=True).logits[:, -1]
        full = model(x).logits[:, -1]
    values = out.past_key_values.layers[0].values  # (1, 2, 301, 8 + 2 * (2 * 8 + 1) -> 48) bf16
    assert values.dtype == torch.bfloat16 and values.shape[-1] == 48
    state = values[..., 8 : 8 + 34].contiguous().view(torch.float32)  # independent read of the documented layout
    assert state[0, 0, :, -1].tolist() == [float(i) for i in range(1, 302)]
    torch.testing.assert_close(step.float(), full.float(), atol=0.1, rtol=0.05)


def test_noncausal_form_refuses_token_by_token_decoding() -> None:
    model = patched_model("llama", "dint_noncausal")
    x = inputs(batch=1, length=6)
    with torch.no_grad():
        out = model(x, use_cache=True)
        with pytest.raises(ValueError, match="causal_integral=False .* cannot decode token by token"):
            model(x[:, :1], cache=out.past_key_values, use_cache=True)


# -- training -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "mistral", "gemma2"])
def test_training_forward_with_a_cache_has_the_same_gradients(family: str) -> None:
    """With a cache present the state is written in place; backward must still work and agree."""
    grads = []
    for use_cache in (False, True):
        model = patched_model(family, "dint")
        model.train()
        x = inputs()
        model(x, labels=x, use_cache=use_cache).loss.backward()
        grads.append([p.grad.clone() for m in ad.method_modules(model).values() for p in m.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


# -- configs and adapter files that do not fit ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,kw,msg",
    [
        ("lowrank_dint", {"rank": 0}, "rank=0: must be an integer >= 1"),
        ("lowrank_dint", {"temperature": "d64"}, "temperature='d64' is not accepted; choose one of 'd81', 'sqrt_d'"),
        ("lowrank_dint", {"rotary": 1}, "rotary=1: must be true or false"),
        ("dint", {"causal_integral": "no"}, "causal_integral='no': must be true or false"),
        ("dint", {"rank": 4}, "unknown field.*rank"),
    ],
)
def test_bad_values_are_explained(name: str, kw: dict, msg: str) -> None:
    with pytest.raises(ad.ConfigError, match=msg):
        ad.config_for(name, **kw)


def test_load_rejects_mismatched_adapters(tmp_path) -> None:  # type: ignore[no-untyped-def]
    ad.save(patched_model("llama", "lowrank"), tmp_path / "a")
    rewrite_adapter(tmp_path / "a", lambda t: t.__setitem__("layers.0.q_up", torch.zeros(32, 5)))
    model = tiny("llama")
    with pytest.raises(ad.AdapterLoadError, match=r"layers\.0\.q_up has shape \(32, 5\), the model expects \(32, 4\)"):
        ad.load(model, tmp_path / "a")
    assert ad.patch.state_of(model) is None
    ad.save(patched_model("llama", "dint"), tmp_path / "b")
    rewrite_adapter(tmp_path / "b", lambda t: t.pop("layers.1.proj2.k_weight"))
    with pytest.raises(ad.AdapterLoadError, match=r"missing tensor\(s\) layers\.1\.proj2\.k_weight"):
        ad.load(tiny("llama"), tmp_path / "b")
    ad.save(patched_model("llama", "dint"), tmp_path / "c")
    with pytest.raises(ad.AdapterLoadError, match="family: adapter 'llama' vs model 'qwen3'"):
        ad.load(tiny("qwen3"), tmp_path / "c")


def test_lowrank_factors_are_separate_for_queries_and_keys() -> None:
    model = patched_model("qwen2", "lowrank", random=False)
    names = sorted(n for n, _ in ad.method_modules(model)[0].named_parameters())
    assert names == ["k_down", "k_up", "lam.lambda_learn", "q_down", "q_up"]
