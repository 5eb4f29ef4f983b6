"""Configs, the lambda schedule, the fused combine (property-based), DEX calibration and Trainer compatibility."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from models import inputs, tiny
from reference import apply_map, explicit_map

import attndenoise as ad
from attndenoise import attention as core

# -- configs -------------------------------------------------------------------------------------------------------


def test_methods_registry_has_core_methods() -> None:
    assert {"daa", "diffq", "diffk", "diffv", "dex"} <= set(ad.METHODS)
    assert ad.METHODS["daa"] is ad.DAAConfig and ad.METHODS["dex"] is ad.DEXConfig


def test_unknown_method_lists_known() -> None:
    with pytest.raises(ad.ConfigError, match="unknown method 'nope'; known methods: .*daa.*dex"):
        ad.config_for("nope")


def test_unknown_field_lists_fields() -> None:
    with pytest.raises(ad.ConfigError, match="unknown field.*wher.*accepted: .*where"):
        ad.config_for("daa", wher="pre_rope")


@pytest.mark.parametrize(
    "name,kw,msg",
    [
        ("daa", {"where": "middle"}, "where='middle' is not accepted; choose one of 'pre_rope', 'post_rope'"),
        ("dex", {"head_fraction": 0}, r"head_fraction=0: must be in \(0, 1\]"),
        ("dex", {"init": "random"}, "choose one of 'identity', 'zero'"),
        ("daa", {"anneal_steps": -1}, "anneal_steps=-1: must be an integer >= 0"),
        ("daa", {"layers": "every:0"}, "every:N"),
        ("daa", {"layers": []}, "non-empty list"),
        ("daa", {"lambda_schedule": "cosine"}, "'paper', 'linear'"),
        ("daa", {"lambda_init": "deep"}, "'depth'"),
        ("daa", {"lambda_init": True}, "lambda_init=True: must be a finite number or 'depth'"),  # bool is no number
    ],
)
def test_bad_values_are_explained(name: str, kw: dict, msg: str) -> None:
    with pytest.raises(ad.ConfigError, match=msg):
        ad.config_for(name, **kw)


def test_layer_index_out_of_range() -> None:
    with pytest.raises(ad.ConfigError, match="index 5 is out of range for a model with 2 layers"):
        ad.apply(tiny("llama"), ad.config_for("daa", layers=[5]))


def test_layer_selection_that_selects_nothing_is_refused() -> None:
    model = tiny("llama")
    before = {n: (p.clone(), p.requires_grad) for n, p in model.named_parameters()}
    # every:2:3 on 2 layers is range(3, 2, 2): empty; every:2:1 is layer 1 alone
    with pytest.raises(ad.ConfigError, match=r"layers='every:2:3' selects no layer of a model with 2 layers"):
        ad.apply(model, ad.config_for("daa", layers="every:2:3"))
    assert ad.patch.state_of(model) is None  # nothing was patched or frozen
    assert all(torch.equal(p, before[n][0]) and p.requires_grad == before[n][1] for n, p in model.named_parameters())
    assert list(ad.method_modules(ad.apply(model, ad.config_for("daa", layers="every:2:1")))) == [1]


def test_load_refuses_non_finite_tensors_naming_them(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from safetensors.torch import load_file, save_file

    from attndenoise.io import WEIGHTS_NAME

    ad.save(ad.apply(tiny("llama"), ad.config_for("daa")), tmp_path)
    tensors = load_file(str(tmp_path / WEIGHTS_NAME))
    tensors["layers.0.weight"][1, 2, 3] = float("inf")
    tensors["layers.1.lam.lambda_learn"][0] = float("nan")
    save_file(tensors, str(tmp_path / WEIGHTS_NAME))
    model = tiny("llama")
    with pytest.raises(ad.AdapterLoadError, match=r"non-finite values \(NaN or inf\) in tensor\(s\) "
                                                  r"layers.0.weight, layers.1.lam.lambda_learn"):
        ad.load(model, tmp_path)
    assert ad.patch.state_of(model) is None  # left as it was
    (tmp_path / WEIGHTS_NAME).write_bytes((tmp_path / WEIGHTS_NAME).read_bytes()[:40])  # truncated
    with pytest.raises(ad.AdapterLoadError, match=rf"{WEIGHTS_NAME}: not a readable safetensors file"):
        ad.load(model, tmp_path)


def test_config_round_trips_through_dict() -> None:
    cfg = ad.config_for("dex", shared=True, layers=[0], anneal_steps=3)
    again = ad.config_for(cfg.to_dict()["method"], **{k: v for k, v in cfg.to_dict().items() if k != "method"})
    assert again == cfg


# -- the lambda schedule (docs/methods.md, section Lambda schedule) ---------------------------------------------


def _literal(t: int, T: int, init: float, learn: float) -> float:
    """DAA eq. 3 written out by hand."""
    if T == 0:
        return learn
    alpha = min(1.0, t / T)
    return (1 - alpha) * (t / T) * init + alpha * learn


@pytest.mark.parametrize("t", [0, 1, 25, 50, 99, 100, 250])
def test_paper_schedule_is_literal(t: int) -> None:
    model = tiny("llama")
    ad.apply(model, ad.config_for("daa", anneal_steps=100, lambda_init=0.8))
    m = ad.method_modules(model)[0]
    with torch.no_grad():
        m.lam.lambda_learn.fill_(0.3)
    ad.set_step(model, t)
    assert m.lam().tolist() == pytest.approx([_literal(t, 100, 0.8, 0.3)] * 4, abs=1e-6)


def test_paper_schedule_peaks_at_quarter_init() -> None:
    model = tiny("llama")
    ad.apply(model, ad.config_for("daa", anneal_steps=100, lambda_init=0.8))
    ad.set_step(model, 50)
    assert float(ad.method_modules(model)[0].lam()[0].detach()) == pytest.approx(0.2)


def test_linear_schedule_and_depth_init() -> None:
    model = tiny("llama")
    ad.apply(model, ad.config_for("daa", anneal_steps=10, lambda_schedule="linear", lambda_init="depth",
                                  lambda_granularity="layer"))
    ad.step(model, 4)
    lams = {i: float(m.lam()[0].detach()) for i, m in ad.method_modules(model).items()}
    for i, v in lams.items():
        assert v == pytest.approx(0.4 * (0.8 - 0.6 * math.exp(-0.3 * i)), abs=1e-6)
    assert ad.method_modules(model)[0].lam.lambda_learn.shape == (1,)


# -- the fused combine against explicit maps (property-based) ------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    b=st.integers(1, 3), n=st.integers(1, 17), hkv=st.sampled_from([1, 2, 4]), g=st.sampled_from([1, 2, 3]),
    d=st.sampled_from([4, 8, 16]), shared=st.booleans(), pad=st.integers(0, 3), seed=st.integers(0, 10_000),
    one_call=st.booleans(),
)
def test_two_maps_fused_equals_explicit(b, n, hkv, g, d, shared, pad, seed, one_call) -> None:  # type: ignore[no-untyped-def]
    gen = torch.Generator().manual_seed(seed)
    h = hkv * g
    q1, q2 = torch.randn(b, h, n, d, generator=gen), torch.randn(b, h, n, d, generator=gen)
    k1, v = torch.randn(b, hkv, n, d, generator=gen), torch.randn(b, hkv, n, d, generator=gen)
    k2 = k1 if shared else torch.randn(b, hkv, n, d, generator=gen)
    c2 = -torch.rand(h, generator=gen)
    mask = None
    if pad and n > 1:  # left padding of the first example, causal bool mask as transformers builds it
        valid = torch.ones(b, n, dtype=torch.bool)
        valid[0, : min(pad, n - 1)] = False
        mask = torch.ones(n, n, dtype=torch.bool).tril()[None, None] & valid[:, None, None, :]
    # Shared keys run as one call with 2h query heads or as one call per query set (core.ONE_CALL_DEVICES): both.
    saved = core.ONE_CALL_DEVICES
    core.ONE_CALL_DEVICES = frozenset({"cpu"}) if one_call else frozenset()
    try:
        out, _ = core.two_maps(q1, k1, q2, k2, v, 1.0, c2, mask=mask, scaling=d**-0.5)
    finally:
        core.ONE_CALL_DEVICES = saved
    want = apply_map(explicit_map(q1, k1, mask, d**-0.5), v) + c2.double().view(1, -1, 1, 1) * apply_map(
        explicit_map(q2, k2, mask, d**-0.5), v
    )
    if mask is not None:  # rows that see no key are zeros, never NaN
        want = want * mask.any(-1, keepdim=True)
    assert not torch.isnan(out).any()
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-4)


def test_combine_is_float32_for_half_inputs() -> None:
    """OpAmp-like gains (K + 1/2, -(K - 1/2)) on two close bf16 outputs: the fp32 combine keeps the difference."""
    gen = torch.Generator().manual_seed(0)
    o1 = (torch.randn(2, 4, 8, 16, generator=gen) * 50).bfloat16()
    o2 = (o1.float() + torch.randn(2, 4, 8, 16, generator=gen) * 0.5).bfloat16()
    want = 10.5 * o1.double() - 9.5 * o2.double()
    out = core.combine([(10.5, o1), (-9.5, o2)], torch.float32)
    naive = (10.5 * o1 - 9.5 * o2).double()  # what bf16 arithmetic gives
    assert (out.double() - want).abs().max() < 1e-3
    assert (naive - want).abs().max() > 0.1


def test_bottom_right_alignment_with_cache_chunk() -> None:
    """Two new queries against 5 cached keys: query i sees keys j <= i + 3 (as in chunked decoding)."""
    m = core.bottom_right_causal(2, 5, torch.device("cpu"))[0, 0]
    assert m.tolist() == [[True, True, True, True, False], [True, True, True, True, True]]


# -- DEX head selection --------------------------------------------------------------------------------------------


def test_dex_entropy_selection_keeps_highest_entropy_heads() -> None:
    model = tiny("llama")
    x = inputs(batch=2, length=10)
    # independent entropy: the stock eager attention maps
    model.set_attn_implementation("eager")
    with torch.no_grad():
        att = model(x, output_attentions=True).attentions
    model.set_attn_implementation("sdpa")
    want = {}
    for i, a in enumerate(att):
        ent = -(a * a.clamp_min(1e-12).log()).sum(-1).mean((0, 2))
        want[str(i)] = sorted(ent.argsort(descending=True)[:2].tolist())
    ad.apply(model, ad.config_for("dex", head_selection="entropy", head_fraction=0.5), calibration_inputs=x)
    cfg = ad.patch.require_state(model).config
    assert cfg.heads == want
    sel = ad.method_modules(model)[0].selected
    assert sel.sum() == 2


def test_dex_entropy_needs_data() -> None:
    with pytest.raises(ad.ConfigError, match="calibration_inputs"):
        ad.apply(tiny("llama"), ad.config_for("dex", head_selection="entropy"))


def test_unknown_apply_argument() -> None:
    with pytest.raises(TypeError, match="takes no extra apply"):
        ad.apply(tiny("llama"), ad.config_for("daa"), calibration_inputs=1)


# -- transformers integration ------------------------------------------------------------------------------------


def test_trainer_trains_method_and_advances_lambda(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from torch.utils.data import Dataset
    from transformers import Trainer, TrainerCallback, TrainingArguments

    class Ids(Dataset):
        def __len__(self) -> int:
            return 16

        def __getitem__(self, i: int) -> dict:
            x = inputs(batch=1, length=12, seed=i)[0]
            return {"input_ids": x, "labels": x}

    model = tiny("llama")
    ad.apply(model, ad.config_for("daa", anneal_steps=4))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=6,
                             learning_rate=1e-2, report_to=[], use_cpu=True, logging_steps=2, save_strategy="no")
    seen: list[str] = []

    class Spy(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):  # type: ignore[no-untyped-def]
            seen.extend(logs or {})

    trainer = Trainer(model=model, args=args, train_dataset=Ids(), callbacks=[ad.LambdaCallback(), Spy()])
    trainer.train()
    assert all(int(m.lam.step) == 6 for m in ad.method_modules(model).values())
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("attndenoise" in n for n in changed)
    assert "lambda/model.layers.1.self_attn.attndenoise.lam" in seen


def test_save_pretrained_and_generate_still_work(tmp_path) -> None:  # type: ignore[no-untyped-def]
    model = tiny("qwen2")
    ad.apply(model, ad.config_for("diffk", anneal_steps=0))
    with pytest.warns(ad.MethodDroppedWarning):  # stock loading would drop the method: never silent
        model.save_pretrained(tmp_path)
    assert (tmp_path / "config.json").exists() and (tmp_path / "attndenoise_config.json").exists()
    out = model.generate(inputs(batch=1, length=5), max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 8)


def test_gradient_checkpointing_matches() -> None:
    model = tiny("llama")
    ad.apply(model, ad.config_for("diffq", anneal_steps=0))
    with torch.no_grad():
        for m in ad.method_modules(model).values():
            m.lam.lambda_learn.fill_(0.5)
    model.train()
    x = inputs()
    loss = model(x, labels=x).loss
    loss.backward()
    g1 = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    assert model.is_activation_checkpointing  # the check below must compare a checkpointed run
    loss2 = model(x, labels=x).loss
    loss2.backward()
    g2 = [p.grad for p in model.parameters() if p.requires_grad]
    assert torch.allclose(loss, loss2)
    for a, b in zip(g1, g2, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_import_does_not_load_the_trainer() -> None:
    # transformers' Trainer pulls in peft, accelerate and datasets (seconds); applying a method must not pay for it.
    import subprocess
    import sys

    code = ("import sys, attndenoise as ad; heavy = [m for m in ('transformers.trainer', 'peft', 'datasets') "
            "if m in sys.modules]; assert not heavy, heavy; from transformers import TrainerCallback; "
            "assert issubclass(ad.LambdaCallback, TrainerCallback)")
    subprocess.run([sys.executable, "-c", code], check=True)
