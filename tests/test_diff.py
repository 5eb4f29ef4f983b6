"""The DIFF attention retrofit (docs/methods.md, section DIFF retrofit; *Differential Transformer*, arXiv
2410.05258) on every supported family.

The common checks (identity at init, causality, cache, padding, gradients, save / load, remove) run for the DIFF
rows of the table in tests/test_matrix.py. Independent references here: explicit float64 maps built from what a
stock model computes (a stock copy whose W_Q/W_K are replaced by the method's W_Q2/W_K2 computes Q2/K2 for us,
q_norm/k_norm and RoPE included), and transformers' own ``DiffLlamaForCausalLM`` for the from-scratch options (head
pairing, output RMSNorm, (1 - lambda_init), re-parameterised lambda).
"""

from __future__ import annotations

import math

import pytest
import torch
from matrix import Case, cases, check_matches_reference, left_pad, method_config, patched_model, rewrite_adapter
from models import FAMILIES, VOCAB, inputs, tiny
from reference import apply_map, attention_modules, capture, explicit_map, heads_last, with_qk

import attndenoise as ad


def lambda_of(m) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """lambda written out from its definition (anneal_steps=0: lambda_learn, or the re-parameterisation of
    docs/methods.md, section DIFF retrofit), float64, shape (heads,) or (1,)."""
    lam = m.lam
    if hasattr(lam, "lambda_q1"):
        dot = [(getattr(lam, f"lambda_q{i}").double() * getattr(lam, f"lambda_k{i}").double()).sum(-1) for i in (1, 2)]
        return (torch.exp(dot[0]) - torch.exp(dot[1]) + lam.lambda_init).detach()
    return lam.lambda_learn.detach().double()


def norm_eps(model) -> float:  # type: ignore[no-untyped-def]
    return float(getattr(model.config, "rms_norm_eps", None) or model.config.layer_norm_epsilon)


# -- the re-parameterised lambda ---------------------------------------------------------------------------------


def test_reparam_warmup_reaches_diff_lambda() -> None:
    """lambda(0) = 0; past warm-up lambda = exp(lq1.lk1) - exp(lq2.lk2) + lambda_init (docs/methods.md, section
    DIFF retrofit)."""
    model = tiny("llama")
    ad.apply(model, method_config("diff_reparam", anneal_steps=10, lambda_init=0.5))
    m = ad.method_modules(model)[0]
    assert torch.equal(m.lam(), torch.zeros(4))
    ad.step(model, 4)  # paper schedule: (1 - a)(t/T) lambda_init + a r, a = t/T
    r = lambda_of(m).float()
    torch.testing.assert_close(m.lam(), 0.6 * 0.4 * 0.5 + 0.4 * r)
    ad.step(model, 10)
    torch.testing.assert_close(m.lam(), r)
    assert m.lam.lambda_q1.shape == (4, 8)  # per head, head_dim long


# -- fused output == the formula ------------------------------------------------------------------------------------


def expected_output(stock, model, x, case: Case, layer: int = 1) -> torch.Tensor:  # type: ignore[no-untyped-def]
    opts = case.options
    c = capture(stock, x, layer)
    m = ad.method_modules(model)[layer]
    lam = lambda_of(m).view(1, -1, 1, 1)

    def amap(q, k):  # type: ignore[no-untyped-def]
        return explicit_map(q, k, c.mask, c.scaling, c.softcap)

    if opts.get("pairing"):
        h, hkv = c.q.shape[1], c.k.shape[1]
        p = amap(c.q, c.k)
        pc = p[:, : h // 2] - lam * p[:, h // 2 :]  # pair i: head i minus head i + h/2
        vpair = torch.cat([c.v[:, : hkv // 2], c.v[:, hkv // 2 :]], dim=-1)
        o = apply_map(pc, vpair)  # (B, h/2, N, 2d)
    else:
        pr = m.proj2
        other = capture(with_qk(stock, layer, pr.q_weight, pr.q_bias, pr.k_weight, pr.k_bias), x, layer)
        o = apply_map(amap(c.q, c.k), c.v) - lam * apply_map(amap(other.q, other.k), c.v)
    if opts.get("head_norm"):
        lam_init = 0.8 - 0.6 * math.exp(-0.3 * layer) if opts.get("lambda_init") == "depth" else 0.8
        o = o / torch.sqrt(o.square().mean(-1, keepdim=True) + norm_eps(stock)) * (1 - lam_init)
    return heads_last(o)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("case", cases("diff"), ids=str)
def test_fused_matches_reference(family: str, case: Case) -> None:
    stock = tiny(family)
    model = patched_model(family, case, layers=[1])
    x = inputs()
    check_matches_reference(model, x, expected_output(stock, model, x, case))


def test_output_attentions_is_the_difference_map() -> None:
    stock = tiny("qwen3")
    model = patched_model("qwen3", "diff", layers=[1])
    x = inputs()
    c = capture(stock, x, 1)
    m = ad.method_modules(model)[1]
    pr = m.proj2
    c2 = capture(with_qk(stock, 1, pr.q_weight, pr.q_bias, pr.k_weight, pr.k_bias), x, 1)
    lam = lambda_of(m).view(1, -1, 1, 1)
    want = explicit_map(c.q, c.k, None, c.scaling) - lam * explicit_map(c2.q, c2.k, None, c.scaling)
    with torch.no_grad():
        att = model(x, output_attentions=True).attentions
    torch.testing.assert_close(att[1].double(), want, atol=1e-5, rtol=1e-4)


# -- what the retrofit copies and caches ----------------------------------------------------------------------


def test_second_projections_are_copies_not_views() -> None:
    """W_Q2/W_K2 start equal to W_Q/W_K (biases too) and are their own tensors: training them leaves the base."""
    model = tiny("qwen2")  # q/k biases
    ad.apply(model, method_config("diff"))
    attn = attention_modules(model)[0]
    pr = ad.method_modules(model)[0].proj2
    assert torch.equal(pr.q_weight, attn.q_proj.weight) and torch.equal(pr.k_bias, attn.k_proj.bias)
    assert pr.q_weight.data_ptr() != attn.q_proj.weight.data_ptr()
    assert pr.q_weight.requires_grad and not attn.q_proj.weight.requires_grad
    assert not vars(ad.patch.require_state(model).config).get("_second_projection_sources")  # consumed by apply


def test_k2_is_cached_next_to_k() -> None:
    model = patched_model("llama", "diff")
    out = model(inputs(batch=1, length=5), use_cache=True)
    layer = out.past_key_values.layers[0]
    assert layer.keys.shape == (1, 2, 5, 16)  # K and K2 side by side
    assert layer.values.shape == (1, 2, 5, 8)


def test_pairing_caches_paired_values_in_place_of_v() -> None:
    model = patched_model("llama", "diff_scratch")
    out = model(inputs(batch=1, length=5), use_cache=True)
    layer = out.past_key_values.layers[0]
    assert layer.keys.shape == (1, 2, 5, 8)
    assert layer.values.shape == (1, 1, 5, 16)  # [V_0, V_1] for the single pair of kv heads: same memory as V


# -- transformers' DiffLlama as the independent reference for the from-scratch options -----------------------------


def diffllama_pair(heads: int, kv_heads: int):  # type: ignore[no-untyped-def]
    from transformers import DiffLlamaConfig, DiffLlamaForCausalLM, LlamaConfig, LlamaForCausalLM

    common = dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=heads,
        num_key_value_heads=kv_heads, max_position_embeddings=256, pad_token_id=0, eos_token_id=1, bos_token_id=2,
    )
    torch.manual_seed(0)
    ref = DiffLlamaForCausalLM(DiffLlamaConfig(**common, lambda_std_dev=0.3)).eval()  # random lambda vectors
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    ours = LlamaForCausalLM(LlamaConfig(**common, rms_norm_eps=ref.config.rms_norm_eps)).eval()
    # q/k/v/o projections have the same layout in both (DiffLlama pairs heads inside its forward, not its weights)
    res = ours.load_state_dict(ref.state_dict(), strict=False)
    assert not res.missing_keys and all(".lambda_" in k for k in res.unexpected_keys)
    cfg = method_config("diff_scratch", anneal_steps=0, lambda_granularity="layer")
    ad.apply(ours, cfg)
    with torch.no_grad():
        for i, m in ad.method_modules(ours).items():
            a = ref.model.layers[i].self_attn
            for n in ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2"):
                getattr(m.lam, n).copy_(getattr(a, n)[None])
    return ref, ours


@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (8, 2), (4, 4)])
def test_matches_transformers_diffllama(heads: int, kv_heads: int) -> None:
    ref, ours = diffllama_pair(heads, kv_heads)
    x = inputs(length=12)
    long, short = inputs(batch=1, length=12, seed=3), inputs(batch=1, length=8, seed=4)
    ids_s, mask_s, _ = left_pad(short, 4)
    batch, mask = torch.cat([long, ids_s]), torch.cat([torch.ones_like(long), mask_s])
    with torch.no_grad():
        torch.testing.assert_close(ours(x).logits, ref(x).logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(
            ours(batch, attention_mask=mask).logits[mask.bool()], ref(batch, attention_mask=mask).logits[mask.bool()],
            atol=1e-5, rtol=1e-5,
        )
        kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
        assert torch.equal(ours.generate(inputs(1, 6), **kw), ref.generate(inputs(1, 6), **kw))
        with ad.reference_mode(ours):
            torch.testing.assert_close(ours(x).logits, ref(x).logits, atol=1e-5, rtol=1e-5)


def test_pairing_needs_even_kv_heads() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from attndenoise.patch import state_of

    model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=1))
    before = {n: (p.requires_grad, p.detach().clone()) for n, p in model.named_parameters()}
    with pytest.raises(ad.ConfigError, match="pairing=True needs an even number .* 4 query and 1 key/value"):
        ad.apply(model, method_config("diff_scratch"))
    # A refused apply leaves the model as it was: nothing frozen, nothing attached (a regression: the base used to be
    # frozen before the method modules were built, so this refusal left every parameter frozen).
    assert {n: p.requires_grad for n, p in model.named_parameters()} == {n: g for n, (g, _) in before.items()}
    assert all(torch.equal(p, before[n][1]) for n, p in model.named_parameters())
    assert state_of(model) is None
    ad.apply(model, ad.config_for("daa"))  # and it can still be patched


# -- configs and adapter files that do not fit ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw,msg",
    [
        ({"pairing": "yes"}, "pairing='yes': must be true or false"),
        ({"norm_eps": 0}, "norm_eps=0: must be a number > 0"),
        ({"lambda_std": -1}, "lambda_std=-1: must be a number >= 0"),
    ],
)
def test_bad_values_are_explained(kw: dict, msg: str) -> None:
    with pytest.raises(ad.ConfigError, match=msg):
        ad.config_for("diff", **kw)


def test_norm_eps_resolved_from_model_and_saved(tmp_path) -> None:  # type: ignore[no-untyped-def]
    model = tiny("gemma3")
    ad.apply(model, method_config("diff_norm"))
    assert ad.patch.require_state(model).config.norm_eps == model.config.rms_norm_eps
    assert method_config("diff_norm").norm_eps is None  # the user's config is not mutated


def test_load_rejects_mis_shaped_and_missing_tensors(tmp_path) -> None:  # type: ignore[no-untyped-def]
    ad.save(patched_model("qwen2", "diff_reparam"), tmp_path / "a")
    rewrite_adapter(tmp_path / "a", lambda t: t.__setitem__("layers.1.proj2.k_weight", torch.zeros(16, 31)))
    model = tiny("qwen2")
    with pytest.raises(ad.AdapterLoadError, match=r"layers\.1\.proj2\.k_weight has shape \(16, 31\)"):
        ad.load(model, tmp_path / "a")
    assert ad.patch.state_of(model) is None
    ad.save(patched_model("qwen2", "diff_reparam"), tmp_path / "b")
    rewrite_adapter(tmp_path / "b", lambda t: t.pop("layers.0.lam.lambda_k2"))
    with pytest.raises(ad.AdapterLoadError, match=r"missing tensor\(s\) layers\.0\.lam\.lambda_k2"):
        ad.load(tiny("qwen2"), tmp_path / "b")


def test_load_rejects_other_architecture(tmp_path) -> None:  # type: ignore[no-untyped-def]
    ad.save(patched_model("llama", "diff"), tmp_path)
    with pytest.raises(ad.AdapterLoadError, match="family: adapter 'llama' vs model 'mistral'"):
        ad.load(tiny("mistral"), tmp_path)
