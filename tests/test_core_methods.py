"""DAA, DiffQ, DiffK, DiffV and DEX: each method's output against its formula, and the library API around them.

The common checks (identity at init, causality, cache, padding, gradients, save / load, merge, remove) run for these
rows of the table in tests/test_matrix.py. Here every number is compared against an independent reference: explicit
maps built in tests/reference.py from what the stock model computes, or a stock model whose projection weights were
changed so that it computes the method's formula for us (DiffQ/K/V; docs/methods.md, sections DAA, DiffQ, DiffK,
DiffV and DEX).
"""

from __future__ import annotations

import json

import pytest
import torch
from matrix import Case, cases, check_matches_reference, patched_model, rewrite_adapter
from models import FAMILIES, VOCAB, inputs, tiny
from reference import (
    apply_map,
    capture,
    explicit_map,
    heads_last,
    rope,
    set_projection,
)

import attndenoise as ad

# -- fused output == the method's formula ---------------------------------------------------------------------------


def expected_output(case: Case, stock, model, x):  # type: ignore[no-untyped-def]
    """The method's formula (docs/methods.md) for the last layer, computed from the stock model and the method's
    parameters."""
    layer = 1
    c = capture(stock, x, layer)
    m = ad.method_modules(model)[layer]
    lam = m.lam.lambda_learn.detach().double()
    attn = [a for a in stock.modules() if type(a).__name__.endswith("Attention")][layer]

    def maps(q, k):  # type: ignore[no-untyped-def]
        return apply_map(explicit_map(q, k, c.mask, c.scaling, c.softcap), c.v)

    name = case.method
    lam4 = lam.view(1, -1, 1, 1)
    if name == "daa":
        w = m.weight.detach()
        if case.options.get("where") == "post_rope":
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
    raise AssertionError(case)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("case", cases("daa", "diffq", "diffk", "diffv", "dex"), ids=str)
def test_fused_matches_reference(family: str, case: Case) -> None:
    stock = tiny(family)
    model = patched_model(family, case, layers=[1])
    x = inputs()
    check_matches_reference(model, x, expected_output(case, stock, model, x))


# -- adapter files that do not fit ---------------------------------------------------------------------------------


def _saved(tmp_path, family="llama", case="daa"):  # type: ignore[no-untyped-def]
    model = patched_model(family, case)
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
    d = _saved(tmp_path, case="dex")
    meta = json.loads((d / "attndenoise_config.json").read_text())
    assert meta["config"]["method"] == "dex" and meta["base"]["family"] == "llama"


# -- misc API behaviour --------------------------------------------------------------------------------------------


def test_apply_twice_is_refused() -> None:
    model = patched_model("llama", "daa")
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
    model = patched_model("llama", "diffk")
    out = model(inputs(batch=1, length=5), use_cache=True)
    keys = out.past_key_values.layers[0].keys
    assert keys.shape[-1] == 2 * 8  # K and K2 side by side, one cache entry per position
    assert keys.shape[-2] == 5


def test_output_attentions_returns_combined_map() -> None:
    """The map returned with output_attentions is the method's effective map A1 - lambda A2 (what the attention
    measures read: docs/methods.md, section Attention measures)."""
    stock = tiny("llama")
    model = patched_model("llama", "daa_post", layers=[1])
    x = inputs()
    c = capture(stock, x, 1)
    m = ad.method_modules(model)[1]
    lam = m.lam.lambda_learn.detach().double().view(1, -1, 1, 1)
    want = explicit_map(c.q, c.k, None, c.scaling) - lam * explicit_map(c.q @ m.weight.detach(), c.k, None, c.scaling)
    with torch.no_grad():
        att = model(x, output_attentions=True).attentions
    torch.testing.assert_close(att[1].double(), want, atol=1e-5, rtol=1e-4)
