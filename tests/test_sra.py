"""Scaled ReAttention (docs/methods.md, section SRA; *Pay Attention to What You Need*, arXiv 2307.13365) on every
supported family.

The independent reference is an attention function registered here: it builds the full float64 probability map of
every layer and applies the rule of docs/methods.md, section SRA, literally (block positions recomputed from its
formulas, one (head, row) at a time, weights key by key). Nothing of attndenoise's SRA code is used by it. The
models are tiny random models with 4 layers (so that both rules run: inter on layers 0-2, outer on layers 1-2) whose
query/key projections are scaled up so the maps are peaky and the rule really selects and eliminates
(tests/models.py, ``peaky``). The common checks run for the SRA row of the table in tests/test_matrix.py.
"""

from __future__ import annotations

import copy
import json
import math
import warnings
from typing import Any

import models
import pytest
import torch
from matrix import left_pad
from models import FAMILIES, inputs
from reference import apply_map, explicit_map
from safetensors.torch import load_file
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask

import attndenoise as ad
from attndenoise import ConfigError
from attndenoise.methods.sra import ShortPromptWarning

LAYERS = 4
N = 60
#: small b/t so a 60-token prompt holds every block (inter rows 26..47, outer rows 54..59 for layers 0..2)
OPTS: dict[str, Any] = dict(b=2, t=6)
ATOL = 2e-5
WINDOW = 24
SLIDING = ("mistral", "gemma2", "gemma3")


def deep(family: str, seed: int = 0) -> torch.nn.Module:
    """A tiny 4-layer model of ``family`` with peaky attention (query/key projections x 15), windows of 24."""
    return models.peaky(family, seed, layers=LAYERS, window=WINDOW)


def sra(**kw: Any) -> ad.SRAConfig:
    return ad.config_for("sra", **{**OPTS, **kw})  # type: ignore[return-value]


# -- the independent reference ------------------------------------------------------------------------------------

#: options of the reference run and what it recorded: maps[layer] (B, H, N, N), removed[(layer, b, h, row)] = R
REF: dict[str, Any] = {}

_DEFAULTS = dict(b=100, t=200, dynamic_t=False, dynamic_div=20.0, alpha_inter=0.5, alpha_outer=0.3,
                 strengthen_inter=4.0, strengthen_outer=4.0, inter=True, outer=True)


def _blocks(n: int, layer: int, o: dict[str, Any]) -> list[tuple[range, range, float, float]]:
    """docs/methods.md, section SRA, 'Which rows and keys', transcribed: (rows, target keys, tau, strengthen factor).
    As in the authors' get_attention_block_inter / _outer, a rule gives no block when the prompt is too short for it,
    independently of the other rule."""
    L, b = LAYERS, o["b"]
    t = int(n / o["dynamic_div"]) if o["dynamic_t"] else o["t"]
    out = []
    if o["inter"] and layer <= L - 2 and n > b + t + 3:
        c = math.ceil((n - b - t - 3) / (L + 3))
        s = (layer + 3) * c + b + 3
        e = min(s + c, n - t)
        out.append((range(s, e), range(s - 3 * (e - s), s - 2 * (e - s)), o["alpha_inter"] / (s - b),
                    o["strengthen_inter"]))
    if o["outer"] and 1 <= layer <= L - 2 and n > t + 3:
        c2 = math.ceil((n - t - 3) / (L + 3))
        start = (layer + 2) * c2 + 3
        end = min(start + c2, n - t)
        out.append((range(n - t, n), range(start, end), o["alpha_outer"] / (n - t), o["strengthen_outer"]))
    return out


def _reference_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):  # type: ignore[no-untyped-def]
    o = {**_DEFAULTS, **REF["opts"]}
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    p = explicit_map(query, key, attention_mask, scale, kwargs.get("softcap"))  # (B, H, Nq, Nk) float64
    nq, nk = query.shape[-2], key.shape[-2]
    layer = module.layer_idx
    visible = attention_mask[:, 0] > torch.finfo(attention_mask.dtype).min / 2  # (B, Nq, Nk)
    if nq == nk and nq > 1 and layer < LAYERS - 1:  # prefill, not the last layer
        for bi in range(p.shape[0]):
            valid = visible[bi].any(dim=0).nonzero().flatten().tolist()  # the example's valid tokens
            assert valid == list(range(valid[0], valid[0] + len(valid)))
            z, n = valid[0], len(valid)
            for rows, targets, tau, s in _blocks(n, layer, o):
                tg = slice(z + targets.start, z + targets.stop)
                for h in range(p.shape[1]):
                    for i in rows:
                        row = p[bi, h, z + i].clone()
                        if not bool((row[tg] > tau).any()):
                            continue  # no hidden gem among this row's targets
                        removed = row[(row < tau) & (row > 0)].sum()
                        new = row.masked_fill(row < tau, 0.0)
                        # survivors 100, eliminated 5; target keys the model's mask hides (sliding window) 0
                        seen = visible[bi, z + i, tg].double()
                        weights = torch.where(row[tg] >= tau, 100.0, 5.0) * seen
                        new[tg] += s * removed * weights / weights.sum()
                        p[bi, h, z + i] = new
                        REF["removed"][(layer, bi, h, i)] = float(removed)
                        REF["hidden"] += int((seen == 0).sum())
    REF["maps"][layer] = p
    out = apply_map(p, value).to(query.dtype)
    return out.transpose(1, 2).contiguous(), p.to(query.dtype)


AttentionInterface.register("sra_reference", _reference_attention)
AttentionMaskInterface.register("sra_reference", eager_mask)


def reference_run(model: torch.nn.Module, x: torch.Tensor, **fwd: Any) -> Any:
    """Logits (and maps) of the stock ``model`` with the reference SRA attention; ``REF`` holds the options."""
    REF.update(maps={}, removed={}, hidden=0)
    original = model.config._attn_implementation
    model.set_attn_implementation("sra_reference")
    try:
        with torch.no_grad():
            return model(x, **fwd)
    finally:
        model.set_attn_implementation(original)


# -- configuration --------------------------------------------------------------------------------------------


def test_registered_without_parameters() -> None:
    cfg = ad.config_for("sra")
    assert isinstance(cfg, ad.SRAConfig) and ad.METHODS["sra"] is ad.SRAConfig
    assert ad.SRAConfig.trainable is False
    assert (cfg.b, cfg.t, cfg.alpha_inter, cfg.alpha_outer, cfg.strengthen_inter, cfg.strengthen_outer) == (
        100, 200, 0.5, 0.3, 4.0, 4.0)  # the authors' init_sra
    assert cfg.layers == "all" and cfg.inter and cfg.outer and not cfg.dynamic_t and cfg.dynamic_div == 20
    assert cfg.short_prompt == "skip"  # a rule too short for the prompt is skipped, as in the authors' code
    model = ad.apply(deep("llama"), cfg)
    assert not any(True for m in ad.method_modules(model).values() for _ in m.parameters())
    assert not any(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("kw,msg", [
    (dict(alpha_inter=-0.1), "alpha_inter"), (dict(alpha_outer=float("nan")), "alpha_outer"),
    (dict(strengthen_inter=-1), "strengthen_inter"), (dict(strengthen_outer="4"), "strengthen_outer"),
    (dict(b=-1), "b="), (dict(t=2.5), "t="), (dict(t=True), "t="), (dict(dynamic_div=0), "dynamic_div"),
    (dict(dynamic_t="yes"), "dynamic_t"), (dict(inter=False, outer=False), "at least one rule"),
    (dict(short_prompt="ignore"), "'error', 'skip'"), (dict(max_block_elements=0), "max_block_elements"),
    (dict(bogus=1), "accepted"),
])
def test_bad_values_are_refused_at_config_time(kw: dict[str, Any], msg: str) -> None:
    with pytest.raises(ConfigError, match=msg):
        ad.config_for("sra", **kw)


def test_block_positions_by_hand() -> None:
    """n=60, b=2, t=6, L=4, worked out by hand from docs/methods.md, section SRA (c = ceil(49/7) = 7,
    c' = ceil(51/7) = 8)."""
    from attndenoise.methods.sra import plan

    cfg = sra()
    assert [(s.rule, s.rows, s.targets) for s in plan(cfg, 60, 0, 4)] == [("inter", (26, 33), (5, 12))]
    got = plan(cfg, 60, 1, 4)
    assert [(s.rule, s.rows, s.targets) for s in got] == [("inter", (33, 40), (12, 19)), ("outer", (54, 60), (27, 35))]
    assert got[0].tau == pytest.approx(0.5 / 31) and got[1].tau == pytest.approx(0.3 / 54)
    assert [s.rows for s in plan(cfg, 60, 2, 4)] == [(40, 47), (54, 60)]
    assert plan(cfg, 60, 3, 4) == []  # last layer
    # n = b + t + 4: chunks of 1 token; every block starts at or after n - t, so nothing is edited
    assert all(plan(cfg, 12, layer, 4) == [] for layer in range(4))
    assert plan(sra(dynamic_t=True), 60, 1, 4)[1].rows == (57, 60)  # t = 60 / 20 = 3


# -- numbers against the reference ----------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_alpha_zero_is_the_stock_model_exactly(family: str) -> None:
    model = deep(family)
    x = inputs(batch=1, length=N)
    with torch.no_grad():
        want = model(x).logits
        ad.apply(model, sra(alpha_inter=0.0, alpha_outer=0.0))
        assert torch.equal(model(x).logits, want)


@pytest.mark.parametrize("family", FAMILIES)
def test_matches_literal_reference(family: str) -> None:
    model = deep(family)
    x = inputs(batch=1, length=N)
    REF["opts"] = dict(OPTS)
    ref = reference_run(model, x, output_attentions=True)
    layers_edited = {k[0] for k in REF["removed"]}
    assert layers_edited == {0, 1, 2}  # the test is not vacuous: every editing layer edits
    assert any(k[3] >= N - OPTS["t"] for k in REF["removed"])  # ... and the outer rule fires
    assert (REF["hidden"] > 0) == (family in SLIDING)  # windowed targets are exercised
    ref_maps, removed = REF["maps"], dict(REF["removed"])
    with torch.no_grad():
        stock = model(x).logits
        ad.apply(model, sra())
        got = model(x).logits
        eager = model(x, output_attentions=True)
    assert (got - stock).abs().max() > 1e-3  # SRA changes the model
    torch.testing.assert_close(got.double(), ref.logits.double(), atol=ATOL, rtol=1e-4)
    torch.testing.assert_close(eager.logits.double(), ref.logits.double(), atol=ATOL, rtol=1e-4)
    for layer in range(LAYERS):  # output_attentions returns the edited maps
        torch.testing.assert_close(eager.attentions[layer].double(), ref_maps[layer], atol=1e-5, rtol=1e-4)
    # edited rows are not renormalised: they sum to 1 + (s - 1) R (s = 4)
    for (layer, b, h, i), r in removed.items():
        total = float(eager.attentions[layer][b, h, i].sum())
        assert total == pytest.approx(1 + 3 * r, abs=1e-5)


@pytest.mark.parametrize("rules", [dict(outer=False), dict(inter=False), dict(strengthen_outer=1.0, alpha_inter=0.9)])
def test_rule_options_match_reference(rules: dict[str, Any]) -> None:
    model = deep("llama", seed=3)
    x = inputs(batch=1, length=N, seed=5)
    REF["opts"] = {**OPTS, **rules}
    ref = reference_run(model, x).logits
    assert REF["removed"]
    with torch.no_grad():
        ad.apply(model, sra(**rules))
        got = model(x).logits
    torch.testing.assert_close(got.double(), ref.double(), atol=ATOL, rtol=1e-4)


def test_row_slicing_does_not_change_results() -> None:
    """max_block_elements=1 builds one row at a time; the result is the default's (up to matmul round-off)."""
    model = deep("qwen2")
    x = inputs(batch=1, length=N)
    with torch.no_grad():
        ad.apply(model, sra())
        want = model(x).logits
        ad.remove(model)
        ad.apply(model, sra(max_block_elements=1))
        torch.testing.assert_close(model(x).logits, want, atol=1e-6, rtol=1e-6)


def test_last_layer_is_never_edited() -> None:
    model = deep("llama")
    x = inputs(batch=1, length=N)
    with torch.no_grad():
        want = model(x).logits
        ad.apply(model, sra(layers=[-1], alpha_inter=5.0, alpha_outer=5.0))
        assert torch.equal(model(x).logits, want)


# -- batches and padding ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dynamic", [False, True])
def test_padded_batch_equals_per_example(family: str, dynamic: bool) -> None:
    """n and positions are counted per example in its valid region (dynamic t differs per example: 6 vs 5)."""
    opts = dict(dynamic_t=True, dynamic_div=10.0) if dynamic else {}
    model = deep(family)
    long, short = inputs(batch=1, length=N, seed=3), inputs(batch=1, length=N - 10, seed=4)
    ids_s, mask_s, pos_s = left_pad(short, 10)
    batch = torch.cat([long, ids_s])
    mask = torch.cat([torch.ones_like(long), mask_s])
    pos = torch.cat([torch.arange(N)[None], pos_s])
    REF["opts"] = {**OPTS, **opts}
    ref = reference_run(model, batch, attention_mask=mask, position_ids=pos).logits
    with torch.no_grad():
        ad.apply(model, sra(**opts))
        out = model(batch, attention_mask=mask, position_ids=pos).logits
        alone_short = model(short).logits
        alone_long = model(long).logits
    assert not torch.isnan(out).any()
    torch.testing.assert_close(out[0], alone_long[0], atol=ATOL, rtol=1e-4)
    torch.testing.assert_close(out[1, 10:], alone_short[0], atol=ATOL, rtol=1e-4)
    torch.testing.assert_close(out[:, 10:].double(), ref[:, 10:].double(), atol=ATOL, rtol=1e-4)
    torch.testing.assert_close(out[0].double(), ref[0].double(), atol=ATOL, rtol=1e-4)


# -- short prompts: each rule runs when it fits, else it is skipped (one warning) or raises -------------------------


def test_short_prompt_raises_with_error_option() -> None:
    model = deep("llama")
    x = inputs(batch=1, length=11)
    ad.apply(model, sra(short_prompt="error"))  # needs n > b + t + 3 = 11
    with pytest.raises(ValueError, match=r"example 0 has 11 valid prompt tokens.*b \+ t \+ 3 = 11"), torch.no_grad():
        model(x)
    ad.remove(model)
    ad.apply(model, sra(t=40, short_prompt="error"))  # t longer than the prompt
    with pytest.raises(ValueError, match="inter rule needs more than"), torch.no_grad():
        model(x)
    ad.remove(model)
    ad.apply(model, sra(inter=False, t=8, short_prompt="error"))  # the outer rule alone needs n > t + 3
    with pytest.raises(ValueError, match=r"outer rule needs more than t \+ 3 = 11"), torch.no_grad():
        model(x)
    ad.remove(model)
    with torch.no_grad():
        want = model(x).logits
        ad.apply(model, sra(short_prompt="skip"))  # n = 11: no inter rule; the outer blocks are empty (c' = 1)
        with pytest.warns(ShortPromptWarning):
            assert torch.equal(model(x).logits, want)


def test_library_defaults_raise_on_a_short_prompt_with_error_option() -> None:
    """short_prompt='error': the library defaults (b=100, t=200) refuse a 60-token prompt, in a forward and in
    generate, with a message naming the example, the rule, its bound and the way out."""
    model = deep("llama")
    ad.apply(model, ad.config_for("sra", short_prompt="error"))
    x = inputs(batch=1, length=N)
    msg = r"example 0 has 60 valid prompt tokens; the inter rule needs more than b \+ t \+ 3 = 303 .*'skip'"
    with torch.no_grad():
        with pytest.raises(ValueError, match=msg):
            model(x)
        with pytest.raises(ValueError, match=msg):
            model.generate(x, max_new_tokens=2, do_sample=False, pad_token_id=0)


def _sra_warnings(caught: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, ShortPromptWarning)]


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_outer_rule_alone_when_too_short_for_inter(family: str) -> None:
    """t + 3 < n <= b + t + 3 (b=60, t=6, n=60: 9 < 60 <= 69): the outer rule runs, the inter rule does not (the
    authors' code does the same); compared with the literal reference."""
    opts = dict(b=60, t=6)
    model = deep(family)
    x = inputs(batch=1, length=N)
    REF["opts"] = dict(opts)
    ref = reference_run(model, x).logits
    assert {k[0] for k in REF["removed"]} == {1, 2}  # the outer layers edit ...
    assert all(k[3] >= N - opts["t"] for k in REF["removed"])  # ... their last t rows only: no inter rows
    with torch.no_grad():
        stock = model(x).logits
        ad.apply(model, sra(**opts))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = model(x).logits
    assert (got - stock).abs().max() > 1e-3  # not the stock model: the outer rule ran
    torch.testing.assert_close(got.double(), ref.double(), atol=ATOL, rtol=1e-4)
    [msg] = _sra_warnings(caught)
    assert "inter rule (needs n > b + t + 3 = 69)" in msg and "outer rule" not in msg


def test_library_defaults_on_a_250_token_prompt() -> None:
    """The library defaults (b=100, t=200) on a 250-token prompt: 203 < 250 <= 303, so the outer rule alone runs
    (rows 50..249 toward chunks of 7 keys) where this used to raise."""
    model = deep("llama")
    x = inputs(batch=1, length=250, seed=2)
    REF["opts"] = {}  # the reference's defaults are the authors' init_sra
    ref = reference_run(model, x).logits
    assert REF["removed"] and all(k[3] >= 50 for k in REF["removed"])
    with torch.no_grad():
        stock = model(x).logits
        ad.apply(model, ad.config_for("sra"))
        with pytest.warns(ShortPromptWarning, match="inter rule"):
            got = model(x).logits
    assert (got - stock).abs().max() > 1e-3
    torch.testing.assert_close(got.double(), ref.double(), atol=ATOL, rtol=1e-4)


@pytest.mark.parametrize("family", ["llama", "mistral", "gpt2"])
def test_prompt_fitting_no_rule_is_the_stock_model(family: str) -> None:
    """The library defaults on a 60-token prompt (n <= t + 3 = 203): exactly the stock logits, and greedy generation
    identical to the stock model's; one warning for all of it."""
    model = deep(family)
    x = inputs(batch=1, length=N)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        want, want_gen = model(x).logits, model.generate(x, **kw)
        ad.apply(model, ad.config_for("sra"))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = model(x).logits
            gen = model.generate(x, **kw)
            model(inputs(batch=1, length=40, seed=7))
    assert torch.equal(got, want)
    assert gen.shape == (1, N + 6) and torch.equal(gen, want_gen)
    [msg] = _sra_warnings(caught)  # once: not per layer, per step, per call or per prompt
    assert "example 0 has 60 valid prompt tokens" in msg
    assert "inter rule (needs n > b + t + 3 = 303)" in msg and "outer rule (needs n > t + 3 = 203)" in msg
    assert "short_prompt='error'" in msg


def test_short_prompt_warning_is_once_per_configuration() -> None:
    model = deep("llama")
    cfg = sra(b=60)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ad.apply(model, sra())
        with torch.no_grad():
            model(inputs(batch=1, length=N))  # fits both rules: silent
            model.generate(inputs(batch=1, length=N), max_new_tokens=3, do_sample=False, pad_token_id=0)
        assert _sra_warnings(caught) == []
        ad.remove(model)
        ad.apply(model, cfg)
        with torch.no_grad():
            for length in (N, N - 5, 8, N):  # too short for inter, then (n = 8 <= t + 3) for both: still one warning
                model(inputs(batch=1, length=length))
            model.generate(inputs(batch=1, length=N), max_new_tokens=3, do_sample=False, pad_token_id=0)
        assert len(_sra_warnings(caught)) == 1
        ad.remove(model)
        ad.apply(model, sra(b=60))  # another configuration warns again
        with torch.no_grad():
            model(inputs(batch=1, length=N))
        assert len(_sra_warnings(caught)) == 2


def test_short_example_in_a_batch() -> None:
    """The error names the example; with short_prompt='skip' the long example is still edited."""
    model = deep("llama")
    long, short = inputs(batch=1, length=N, seed=3), inputs(batch=1, length=9, seed=4)
    ids_s, mask_s, pos_s = left_pad(short, N - 9)
    batch, mask = torch.cat([long, ids_s]), torch.cat([torch.ones_like(long), mask_s])
    pos = torch.cat([torch.arange(N)[None], pos_s])
    with torch.no_grad():
        stock_short = model(short).logits
        ad.apply(model, sra(short_prompt="error"))
        with pytest.raises(ValueError, match="example 1 has 9 valid"):
            model(batch, attention_mask=mask, position_ids=pos)
        ad.remove(model)
        ad.apply(model, sra(short_prompt="skip"))
        alone_long = model(long).logits
        with pytest.warns(ShortPromptWarning, match="example 1 has 9 valid"):
            out = model(batch, attention_mask=mask, position_ids=pos).logits
    torch.testing.assert_close(out[0], alone_long[0], atol=ATOL, rtol=1e-4)
    torch.testing.assert_close(out[1, N - 9:], stock_short[0], atol=ATOL, rtol=1e-4)


def test_configuration_is_not_mutated_while_running() -> None:
    model = deep("llama")
    cfg = sra(dynamic_t=True)
    before = json.dumps(cfg.to_dict(), sort_keys=True)
    ad.apply(model, cfg)
    with torch.no_grad():
        model(inputs(batch=1, length=N))
        model(inputs(batch=1, length=N + 20))
    assert json.dumps(ad.method_modules(model)[0].config.to_dict(), sort_keys=True) == before


# -- cache and generation -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "mistral", "gemma2", "gpt2"])
def test_decoding_steps_are_stock_over_the_sra_cache(family: str) -> None:
    """After an SRA prefill, a decode step (q_len 1) and a cached chunk (q_len 3 with past tokens) compute exactly
    what the stock model computes over the same (SRA-altered) cache."""
    model = deep(family)
    x = inputs(batch=1, length=N)
    nxt = inputs(batch=1, length=3, seed=9)
    ad.apply(model, sra())
    with torch.no_grad():
        pre = model(x, use_cache=True)
        caches = [copy.deepcopy(pre.past_key_values) for _ in range(4)]
        sra_one = model(nxt[:, :1], cache=caches[0], use_cache=True).logits
        sra_chunk = model(nxt, cache=caches[1], use_cache=True).logits
        ad.remove(model)
        stock_one = model(nxt[:, :1], cache=caches[2], use_cache=True).logits
        stock_chunk = model(nxt, cache=caches[3], use_cache=True).logits
        stock_prefill = model(x).logits
    assert (pre.logits - stock_prefill).abs().max() > 1e-3  # the prefill was edited
    torch.testing.assert_close(sra_one, stock_one, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(sra_chunk, stock_chunk, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("family", ["llama", "qwen3", "phi3"])
def test_generate_is_sra_prefill_then_stock_decoding(family: str) -> None:
    model = deep(family)
    x = inputs(batch=1, length=N)
    ad.apply(model, sra())
    with torch.no_grad():
        gen = model.generate(x, max_new_tokens=6, do_sample=False, pad_token_id=0)
        out = model(x, use_cache=True)  # manual greedy loop: SRA prefill, then one token at a time
        tokens = [out.logits[:, -1].argmax(-1)]
        cache = out.past_key_values
        for _ in range(5):
            out = model(tokens[-1][:, None], cache=cache, use_cache=True)
            tokens.append(out.logits[:, -1].argmax(-1))
            cache = out.past_key_values
    assert gen.shape == (1, N + 6)
    assert torch.equal(gen[:, N:], torch.stack(tokens, 1))


def test_generate_left_padded_batch_equals_per_example() -> None:
    model = deep("llama")
    long, short = inputs(batch=1, length=N, seed=3), inputs(batch=1, length=N - 10, seed=4)
    ids_s, mask_s, _ = left_pad(short, 10)
    batch, mask = torch.cat([long, ids_s]), torch.cat([torch.ones_like(long), mask_s])
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    ad.apply(model, sra())
    with torch.no_grad():
        both = model.generate(batch, attention_mask=mask, **kw)
        alone = [model.generate(x, **kw) for x in (long, short)]
    assert torch.equal(both[0, N:], alone[0][0, N:]) and torch.equal(both[1, N:], alone[1][0, N - 10:])


# -- save / load / remove -------------------------------------------------------------------------------------------


def test_save_load_with_no_tensors(tmp_path) -> None:  # type: ignore[no-untyped-def]
    model = deep("llama")
    x = inputs(batch=1, length=N)
    cfg = sra(dynamic_t=True, dynamic_div=12.0, alpha_inter=0.7, strengthen_outer=2.5, outer=True)
    ad.apply(model, cfg)
    with torch.no_grad():
        want = model(x).logits
    ad.save(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["attndenoise_config.json", "attndenoise_model.safetensors"]
    assert load_file(str(tmp_path / "attndenoise_model.safetensors")) == {}
    fresh = ad.load(deep("llama"), tmp_path)
    assert ad.method_modules(fresh)[0].config == cfg
    with torch.no_grad():
        assert torch.equal(fresh(x).logits, want)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_remove_restores_stock(family: str) -> None:
    model = deep(family)
    x = inputs(batch=1, length=N)
    with torch.no_grad():
        want = model(x).logits
        ad.apply(model, sra())
        assert (model(x).logits - want).abs().max() > 1e-3
        ad.remove(model)
        assert torch.equal(model(x).logits, want)
    assert not any("attndenoise" in n for n, _ in model.named_modules())


def test_half_precision_runs() -> None:
    """bf16 models: explicit rows are computed in float32 and cast back once; close to the float32 result."""
    model = deep("llama")
    x = inputs(batch=1, length=N)
    ad.apply(model, sra())
    with torch.no_grad():
        want = model(x).logits
        got = model.to(torch.bfloat16)(x).logits
    assert got.dtype == torch.bfloat16 and torch.isfinite(got).all()
    assert (got.float() - want).abs().max() < 0.5

