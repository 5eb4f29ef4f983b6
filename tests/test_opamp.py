"""OpAmp adaptation (docs/methods.md, section OpAmp; *Efficient OpAmp Adaptation for Zoom Attention to Golden
Contexts*, arXiv 2502.12502) on every supported family, and the loader of the authors' checkpoints.

The common checks (identity at init, causality, cache, padding, gradients, save / load, remove) run for the OpAmp
rows of the table in tests/test_matrix.py. Independent references here: explicit float64 maps built from what the
stock model computes with the adapters and the OpAmp combination written out here from its formula, and,
for :func:`attndenoise.load_opamp_checkpoint`, a stock transformers model whose attention function is the authors'
eager attention written out here from their modelling code (wuhy68/OpampAdapter: adapters on the concatenated
heads after RoPE; Llama adapts the key/value heads, Qwen2 repeats the keys first; re-runs the key adapters over the
whole cache; ``M = A_d (A1 - A2) + A_c (A1 + A2) / 2``). Nothing in that reference imports attndenoise.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from matrix import CASE, Case, cases, check_matches_reference, rewrite_adapter
from models import FAMILIES, VOCAB, inputs, tiny
from reference import apply_map, capture, explicit_map, heads_last
from safetensors.torch import load_file, save_file
from transformers import AttentionInterface, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
from transformers.masking_utils import AttentionMaskInterface, eager_mask

import attndenoise as ad

ADAPTERS = ("q1", "k1", "q2", "k2")


def make(case: str = "opamp", **extra):  # type: ignore[no-untyped-def]
    return CASE[case].config(**extra)


def randomize(model: torch.nn.Module, seed: int = 5, scale: float = 0.1) -> None:
    """Non-zero W2 (and a perturbed W1): the two maps differ, so the OpAmp combination matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in ad.method_modules(model).values():
            for _, p in m.named_parameters():
                p.add_(scale * torch.randn(p.shape, generator=g))


def patched(family: str, case: str = "opamp", random: bool = True, **extra):  # type: ignore[no-untyped-def]
    model = tiny(family)
    ad.apply(model, make(case, **extra))
    if random:
        randomize(model)
    return model


# -- the formulas of docs/methods.md, section OpAmp, written out --------------------------------------------------


def adapter_ref(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, c: float) -> torch.Tensor:
    """``E(x) = x + c W2 gelu(W1 x)`` on (B, heads, N, d) with the heads concatenated, float64."""
    b, h, n, d = x.shape
    flat = x.double().transpose(1, 2).reshape(b, n, h * d)
    y = flat + c * (F.gelu(flat @ w1.double().T) @ w2.double().T)
    return y.view(b, n, h, d).transpose(1, 2)


def weights(m, which: str) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[no-untyped-def]
    a = getattr(m, f"{which}_adapter")
    return a.adapter_down.weight.detach(), a.adapter_up.weight.detach()


def expected_output(stock, model, x, layer: int = 1) -> torch.Tensor:  # type: ignore[no-untyped-def]
    c = capture(stock, x, layer)
    m = ad.method_modules(model)[layer]
    cfg = ad.patch.require_state(model).config
    k = c.k
    if cfg.key_adapters == "repeated":
        k = k.repeat_interleave(c.q.shape[1] // k.shape[1], dim=1)
    q1, q2 = (adapter_ref(c.q, *weights(m, w), cfg.adapter_scaling) for w in ("q1", "q2"))
    k1, k2 = (adapter_ref(k, *weights(m, w), cfg.adapter_scaling) for w in ("k1", "k2"))
    a1 = explicit_map(q1, k1, c.mask, c.scaling, c.softcap)
    a2 = explicit_map(q2, k2, c.mask, c.scaling, c.softcap)
    gain_d, gain_c = cfg.cmrr, 1.0
    m_map = gain_d * (a1 - a2) + gain_c / 2 * (a1 + a2)
    return heads_last(apply_map(m_map, c.v))


# -- identity at init (the common check is in tests/test_matrix.py) ---------------------------------------------


def test_identity_has_no_cancellation_round_off() -> None:
    """The combine is O2 + (K + 1/2)(O1 - O2): with W2 = 0 a huge CMRR still gives the stock output, where
    (K + 1/2) O - (K - 1/2) O would lose ~K ulps."""
    model = tiny("llama")
    x = inputs()
    with torch.no_grad():
        ref = model(x).logits
        ad.apply(model, make(cmrr=1e4))
        out = model(x).logits
    assert (out - ref).abs().max() < 1e-6


def test_identity_in_training_mode_with_adapter_dropout() -> None:
    """Dropout acts on the adapter input only: with W2 = 0 it changes nothing, in training too."""
    model = tiny("llama").train()
    x = inputs()
    with torch.no_grad():
        ref = model(x).logits
        ad.apply(model, make(adapter_dropout=0.5))
        out = model(x).logits
    assert (out - ref).abs().max() < 1e-5


# -- fused output == the formula ------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("case", cases("opamp"), ids=str)
def test_fused_matches_reference(family: str, case: Case) -> None:
    stock = tiny(family)
    sizes = {**dict(adapter_dim=16, adapter_scaling=0.7, cmrr=3.0), **case.options}  # non-default sizes, or the row's
    model = patched(family, case.id, random=False, **{**sizes, "layers": [1]})
    randomize(model, scale=0.5)
    x = inputs()
    want = expected_output(stock, model, x)
    assert (want - capture(stock, x, 1).out.double()).abs().max() > 1e-3  # the adapters matter
    check_matches_reference(model, x, want)


def test_output_attentions_returns_opamp_map() -> None:
    """output_attentions gives M = K (A1 - A2) + (A1 + A2) / 2 (the attention measures read the effective map:
    docs/methods.md, section Attention measures)."""
    stock = tiny("llama")
    model = patched("llama", layers=[1])
    x = inputs()
    c = capture(stock, x, 1)
    m = ad.method_modules(model)[1]
    q1, q2 = (adapter_ref(c.q, *weights(m, w), 1.0) for w in ("q1", "q2"))
    k1, k2 = (adapter_ref(c.k, *weights(m, w), 1.0) for w in ("k1", "k2"))
    a1, a2 = explicit_map(q1, k1, None, c.scaling), explicit_map(q2, k2, None, c.scaling)
    with torch.no_grad():
        att = model(x, output_attentions=True).attentions
    torch.testing.assert_close(att[1].double(), 10 * (a1 - a2) + (a1 + a2) / 2, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(att[1].double().sum(-1), torch.ones(att[1].shape[:-1], dtype=torch.float64), atol=1e-5,
                               rtol=0)


# -- what the cache holds ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "variant,width,heads", [("opamp", 2 * 8, 2), ("opamp_rerun", 8, 2), ("opamp_repeated", 2 * 8, 4)]
)
def test_what_the_cache_holds(variant: str, width: int, heads: int) -> None:
    """Default: K1 and K2 side by side (one entry per position, adapters run once per token); benchmark switch:
    the plain K (the adapters re-run over the cache); Qwen2 layout: one adapted key per query head."""
    model = patched("llama", variant)
    out = model(inputs(batch=1, length=5), use_cache=True)
    keys = out.past_key_values.layers[0].keys
    assert keys.shape == (1, heads, 5, width)


def test_cached_and_rerunning_variants_agree() -> None:
    """The benchmark-only switch changes speed, not results."""
    a = patched("qwen2", "opamp")
    b = patched("qwen2", "opamp_rerun")
    x = inputs(batch=1, length=10)
    with torch.no_grad():
        torch.testing.assert_close(a(x).logits, b(x).logits, atol=1e-6, rtol=1e-6)
        kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert torch.equal(a.generate(x, **kw), b.generate(x, **kw))


# -- training and adapter files ----------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_four_adapters_per_layer(family: str) -> None:
    """W1 and W2 of four adapters per layer are the method's parameters (tests/test_matrix.py checks that each of
    them, and nothing else, gets a gradient)."""
    modules = ad.method_modules(patched(family))
    assert modules
    for m in modules.values():
        assert sorted(n for n, _ in m.named_parameters()) == sorted(
            f"{w}_adapter.adapter_{part}.weight" for w in ADAPTERS for part in ("down", "up"))


def test_gradients_at_init_reach_w2() -> None:
    """At init (W2 = 0) only W2 has a gradient (W1's is multiplied by W2): training starts from the identity."""
    model = tiny("llama")
    ad.apply(model, make(adapter_dropout=0.0))
    x = inputs()
    model(x, labels=x).loss.backward()
    for m in ad.method_modules(model).values():
        for w in ADAPTERS:
            a = getattr(m, f"{w}_adapter")
            assert a.adapter_up.weight.grad.abs().sum() > 0
            assert torch.count_nonzero(a.adapter_down.weight.grad) == 0


def test_adapter_dropout_acts_in_training_only() -> None:
    model = patched("llama", adapter_dropout=0.5)
    x = inputs()
    with torch.no_grad():
        model.eval()
        e1, e2 = model(x).logits, model(x).logits
        model.train()
        t1, t2 = model(x).logits, model(x).logits
    assert torch.equal(e1, e2)
    assert not torch.equal(t1, t2)


@pytest.mark.parametrize("dropout", [0.0, 0.5])
def test_recomputed_adapter_branch_has_the_plain_gradients(dropout: float) -> None:
    """The adapter recomputes its branch in the backward pass (it keeps only its input). Reference: the formula
    ``x + c W2 gelu(W1 dropout(x))`` written out here with plain autograd, on the same dropout mask (same RNG state):
    output and the gradients of W1, W2 and x agree."""
    from attndenoise.methods.opamp import Adapter

    torch.manual_seed(0)
    a = Adapter(24, 6, 0.7, dropout)
    with torch.no_grad():
        a.adapter_up.weight.normal_(0, 0.2)
    x = torch.randn(2, 5, 24, requires_grad=True)
    g = torch.randn(2, 5, 24)
    state = torch.get_rng_state()
    y = a(x, training=True)
    (y * g).sum().backward()
    got = [t.grad.clone() for t in (x, a.adapter_down.weight, a.adapter_up.weight)]
    x2 = x.detach().clone().requires_grad_(True)
    w1 = a.adapter_down.weight.detach().clone().requires_grad_(True)
    w2 = a.adapter_up.weight.detach().clone().requires_grad_(True)
    torch.set_rng_state(state)
    ref = x2 + 0.7 * F.gelu(F.dropout(x2, dropout, training=True) @ w1.T) @ w2.T
    (ref * g).sum().backward()
    torch.testing.assert_close(y, ref, rtol=1e-6, atol=1e-6)
    for mine, want in zip(got, (x2.grad, w1.grad, w2.grad), strict=True):
        torch.testing.assert_close(mine, want, rtol=1e-5, atol=1e-6)


def _saved(tmp_path, **extra):  # type: ignore[no-untyped-def]
    ad.save(patched("llama", **extra), tmp_path)
    return tmp_path


def test_load_rejects_mismatched_adapters(tmp_path) -> None:  # type: ignore[no-untyped-def]
    d = _saved(tmp_path / "a")
    rewrite_adapter(d, lambda t: t.__setitem__("layers.1.k2_adapter.adapter_up.weight", torch.zeros(16, 8)))
    model = tiny("llama")
    with pytest.raises(ad.AdapterLoadError, match=r"layers\.1\.k2_adapter\.adapter_up\.weight has shape \(16, 8\)"):
        ad.load(model, d)
    assert ad.patch.state_of(model) is None
    d = _saved(tmp_path / "b")
    rewrite_adapter(d, lambda t: t.pop("layers.0.q2_adapter.adapter_down.weight"))
    with pytest.raises(ad.AdapterLoadError, match=r"missing tensor\(s\) layers\.0\.q2_adapter\.adapter_down\.weight"):
        ad.load(tiny("llama"), d)
    d = _saved(tmp_path / "c", layers=[1])
    rewrite_adapter(d, lambda t: t.__setitem__("layers.0.q1_adapter.adapter_up.weight", torch.zeros(32, 64)))
    with pytest.raises(ad.AdapterLoadError, match=r"unexpected tensor\(s\) layers\.0\.q1_adapter"):
        ad.load(tiny("llama"), d)
    d = _saved(tmp_path / "d")
    with pytest.raises(ad.AdapterLoadError, match="another base architecture"):
        ad.load(tiny("gpt2"), d)


# -- configuration ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("adapter_dim", 0, "adapter_dim=0: must be an integer >= 1"),
        ("adapter_dim", 8.0, "adapter_dim=8.0"),
        ("adapter_scaling", float("nan"), "adapter_scaling=nan"),
        ("adapter_dropout", 1.0, r"adapter_dropout=1\.0: must be in \[0, 1\)"),
        ("adapter_dropout", -0.1, "adapter_dropout=-0.1"),
        ("cmrr", -1.0, "cmrr=-1.0"),
        ("key_adapters", "query", "key_adapters='query' is not accepted; choose one of 'kv_heads', 'repeated'"),
        ("cache_adapted_keys", 1, "cache_adapted_keys=1: must be true or false"),
        ("layers", "every:0", "layers='every:0'"),
    ],
)
def test_config_errors(field: str, value: object, message: str) -> None:
    with pytest.raises(ad.ConfigError, match=message):
        ad.config_for("opamp", **{field: value})


def test_defaults_and_registration() -> None:
    cfg = ad.config_for("opamp")
    assert isinstance(cfg, ad.OpAmpConfig) and ad.METHODS["opamp"] is ad.OpAmpConfig
    assert (cfg.adapter_dim, cfg.adapter_scaling, cfg.adapter_dropout, cfg.cmrr) == (64, 1.0, 0.1, 10.0)
    assert cfg.key_adapters == "kv_heads" and cfg.cache_adapted_keys and cfg.layers == "all"


def test_every_nth_layer_as_the_authors() -> None:
    """Their rule ``layer_idx % adapter_layer == 0`` is ``layers="every:N"``."""
    model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=7,
                                         num_attention_heads=4, num_key_value_heads=2))
    ad.apply(model, make(layers="every:3"))
    assert list(ad.method_modules(model)) == [i for i in range(7) if i % 3 == 0]


def test_adapter_init() -> None:
    m = ad.method_modules(patched("llama", random=False))[0]
    for w in ADAPTERS:
        a = getattr(m, f"{w}_adapter")
        assert torch.count_nonzero(a.adapter_up.weight) == 0
        bound = 1 / math.sqrt(a.adapter_down.weight.shape[1])  # kaiming_uniform(a=sqrt(5)) = nn.Linear's init
        assert a.adapter_down.weight.abs().max() <= bound and a.adapter_down.weight.std() > bound / 4
    assert m.k1_adapter.adapter_down.weight.shape == (64, 2 * 8)  # key/value heads, before GQA repetition
    assert m.q1_adapter.adapter_down.weight.shape == (64, 4 * 8)


# -- the authors' checkpoints -------------------------------------------------------------------------------------

#: per layer index: (weights by "q1"/"k1"/..., (W1, W2)), adapter scaling, CMRR, repeat keys first (Qwen2)
_THEIRS: dict[int, tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], float, float, bool]] = {}


def _their_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):  # type: ignore[no-untyped-def]
    """The authors' eager attention (modeling_opampllama.py / modeling_opampqwen.py), float64, re-running the key
    adapters over the whole (cached) key at every call as their code does."""
    b, h, n, d = query.shape
    groups = h // key.shape[1]

    def repeat_kv(t):  # type: ignore[no-untyped-def]
        return t.repeat_interleave(groups, dim=1)

    def adapter(t, w):  # type: ignore[no-untyped-def]
        bb, hh, nn_, dd = t.shape
        flat = t.double().transpose(1, 2).reshape(bb, nn_, hh * dd)
        out = flat + c * (F.gelu(flat @ w[0].double().T) @ w[1].double().T)
        return out.view(bb, nn_, hh, dd).transpose(1, 2)

    def softmax(q, k):  # type: ignore[no-untyped-def]
        s = q @ k.transpose(2, 3) / math.sqrt(d)
        if attention_mask is not None:
            s = s + attention_mask[:, :, :, : k.shape[-2]].double()
        return torch.softmax(s, dim=-1)

    q, k, v = query.double(), key.double(), value.double()
    entry = _THEIRS.get(module.layer_idx)
    if entry is None:
        attn = softmax(q, repeat_kv(k))
    else:
        w, c, gain_d, repeat_first = entry
        if repeat_first:  # Qwen2: keys repeated to the query heads before the adapters
            k = repeat_kv(k)
        q1, q2 = adapter(q, w["q1"]), adapter(q, w["q2"])
        k1, k2 = adapter(k, w["k1"]), adapter(k, w["k2"])
        if not repeat_first:
            k1, k2 = repeat_kv(k1), repeat_kv(k2)
        a1, a2 = softmax(q1, k1), softmax(q2, k2)
        gain_c = 1
        attn = gain_d * (a1 - a2) + gain_c * (a1 + a2) / 2
    out = attn @ repeat_kv(v)
    return out.transpose(1, 2).to(query.dtype).contiguous(), None


AttentionInterface.register("test_opamp_authors", _their_attention)
AttentionMaskInterface.register("test_opamp_authors", eager_mask)

#: (their model_type, stock classes, adapter_layer, kv heads)
CHECKPOINTS = {
    "llama": ("opampllama", LlamaConfig, LlamaForCausalLM, 2, 2),
    "qwen2": ("opampqwen2", Qwen2Config, Qwen2ForCausalLM, 3, 2),
    "qwen2_mha": ("opampqwen2", Qwen2Config, Qwen2ForCausalLM, 3, 4),
}


def write_their_checkpoint(directory, kind: str, seed: int = 0, shards: int = 1, adapter_dim: int = 8,  # type: ignore[no-untyped-def]
                           settings: dict | None = None):
    """A tiny random model saved as their merge_lora.py + save_pretrained would save it (their names and config
    fields), with trained-looking (non-zero) adapters. Returns (base model, adapter tensors, adapter_layer)."""
    model_type, cfg_cls, model_cls, every, kv = CHECKPOINTS[kind]
    torch.manual_seed(seed)
    cfg = cfg_cls(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=kv, max_position_embeddings=256, tie_word_embeddings=False, pad_token_id=0)
    base = model_cls(cfg).eval()
    with torch.no_grad():
        for name, p in base.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                p.add_(0.1 * torch.randn_like(p))
    h, d = 4, 8
    k_heads = h if model_type == "opampqwen2" else kv
    adapters = {}
    for i in range(0, 4, every):
        for w in ADAPTERS:
            size = (h if w.startswith("q") else k_heads) * d
            down = f"model.layers.{i}.self_attn.{w}_adapter.adapter_down.weight"
            adapters[down] = 0.3 * torch.randn(adapter_dim, size)
            adapters[f"model.layers.{i}.self_attn.{w}_adapter.adapter_up.weight"] = 0.3 * torch.randn(size, adapter_dim)
    tensors = {k: v.detach().clone().contiguous() for k, v in base.state_dict().items()}
    tensors.update(adapters)
    meta = cfg.to_dict()
    meta.update(model_type=model_type, architectures=[model_cls.__name__],
                auto_map={"AutoConfig": "configuration_x.X", "AutoModelForCausalLM": "modeling_x.X"},
                adapter_dim=adapter_dim, adapter_rank=adapter_dim, adapter_scaling=1.0, adapter_lambda=10,
                adapter_layer=every)
    meta.update(settings or {})
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(meta, indent=2))
    names = sorted(tensors)
    if shards == 1:
        save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for s in range(shards):
            part = names[s::shards]
            fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            save_file({k: tensors[k] for k in part}, str(directory / fname), metadata={"format": "pt"})
            weight_map.update({k: fname for k in part})
        (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return base, adapters, every


def their_model(base, adapters, every: int, kind: str, scaling: float = 1.0, cmrr: float = 10.0):  # type: ignore[no-untyped-def]
    """The stock base with the authors' attention (the independent reference)."""
    ref = copy.deepcopy(base)
    _THEIRS.clear()
    for i in range(0, 4, every):
        w = {a: (adapters[f"model.layers.{i}.self_attn.{a}_adapter.adapter_down.weight"],
                 adapters[f"model.layers.{i}.self_attn.{a}_adapter.adapter_up.weight"]) for a in ADAPTERS}
        _THEIRS[i] = (w, scaling, cmrr, CHECKPOINTS[kind][0] == "opampqwen2")
    ref.set_attn_implementation("test_opamp_authors")
    return ref


@pytest.mark.parametrize("kind", list(CHECKPOINTS))
def test_load_their_checkpoint_computes_their_function(kind: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    base, adapters, every = write_their_checkpoint(tmp_path, kind)
    model = ad.load_opamp_checkpoint(tmp_path)
    assert type(model) is CHECKPOINTS[kind][2]  # a stock transformers class
    cfg = ad.patch.require_state(model).config
    assert isinstance(cfg, ad.OpAmpConfig) and cfg.layers == f"every:{every}" and cfg.cmrr == 10.0
    assert cfg.key_adapters == ("repeated" if kind == "qwen2" else "kv_heads")
    assert list(ad.method_modules(model)) == list(range(0, 4, every))
    ref = their_model(base, adapters, every, kind)
    x = inputs(batch=2, length=12)
    with torch.no_grad():
        want, got = ref(x).logits, model(x).logits
        assert (want - base(x).logits).abs().max() > 1e-2  # the adapters matter
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        # generation: our cached adapted keys vs their re-running of the key adapters over the cache
        kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
        assert torch.equal(model.generate(x[:1], **kw), ref.generate(x[:1], **kw))


def test_load_sharded_checkpoint_and_benchmark_switch(tmp_path) -> None:  # type: ignore[no-untyped-def]
    base, adapters, every = write_their_checkpoint(tmp_path, "llama", shards=3)
    model = ad.load_opamp_checkpoint(tmp_path, cache_adapted_keys=False)
    assert ad.patch.require_state(model).config.cache_adapted_keys is False
    x = inputs(batch=1, length=10)
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, their_model(base, adapters, every, "llama")(x).logits,
                                   atol=1e-4, rtol=1e-4)


def test_missing_config_fields_take_their_class_defaults(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """OpampLlamaConfig defaults: adapter_scaling=0.25, adapter_lambda=10 (their training scripts set 1.0 / 10)."""
    base, adapters, every = write_their_checkpoint(tmp_path, "llama")
    meta = json.loads((tmp_path / "config.json").read_text())
    del meta["adapter_scaling"], meta["adapter_lambda"]
    (tmp_path / "config.json").write_text(json.dumps(meta))
    model = ad.load_opamp_checkpoint(tmp_path)
    cfg = ad.patch.require_state(model).config
    assert (cfg.adapter_scaling, cfg.cmrr) == (0.25, 10.0)
    x = inputs(batch=1, length=10)
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, their_model(base, adapters, every, "llama", 0.25)(x).logits,
                                   atol=1e-4, rtol=1e-4)


def _edit_tensors(directory, fn) -> None:  # type: ignore[no-untyped-def]
    f = directory / "model.safetensors"
    t = load_file(str(f))
    fn(t)
    save_file(t, str(f), metadata={"format": "pt"})


def test_load_refuses_missing_adapter(tmp_path) -> None:  # type: ignore[no-untyped-def]
    write_their_checkpoint(tmp_path, "llama")
    _edit_tensors(tmp_path, lambda t: t.pop("model.layers.2.self_attn.k2_adapter.adapter_up.weight"))
    with pytest.raises(ad.AdapterLoadError,
                       match=r"missing adapter tensor\(s\) model\.layers\.2\.self_attn\.k2_adapter\.adapter_up\.weigh"):
        ad.load_opamp_checkpoint(tmp_path)


def test_load_refuses_adapters_their_config_does_not_use(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """E.g. their evaluator's default adapter_layer=1 against a model trained with 2: we name the gap."""
    write_their_checkpoint(tmp_path, "llama")
    meta = json.loads((tmp_path / "config.json").read_text())
    meta["adapter_layer"] = 1
    (tmp_path / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ad.AdapterLoadError,
                       match=r"missing adapter tensor\(s\) model\.layers\.1\.self_attn\.k1_adapter"):
        ad.load_opamp_checkpoint(tmp_path)
    meta["adapter_layer"] = 4
    (tmp_path / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ad.AdapterLoadError,
                       match=r"unexpected adapter tensor\(s\) model\.layers\.2\.self_attn\.k1_adapt.*adapter_layer=4"):
        ad.load_opamp_checkpoint(tmp_path)


def test_load_refuses_unknown_and_missing_base_tensors(tmp_path) -> None:  # type: ignore[no-untyped-def]
    write_their_checkpoint(tmp_path / "a", "qwen2")
    _edit_tensors(tmp_path / "a", lambda t: t.__setitem__("model.layers.0.self_attn.lambda_q1", torch.zeros(8)))
    with pytest.raises(ad.AdapterLoadError, match=r"unexpected tensor\(s\) model\.layers\.0\.self_attn\.lambda_q1"):
        ad.load_opamp_checkpoint(tmp_path / "a")
    write_their_checkpoint(tmp_path / "b", "qwen2")
    _edit_tensors(tmp_path / "b", lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ad.AdapterLoadError, match=r"missing tensor\(s\) model\.layers\.1\.mlp\.up_proj\.weight"):
        ad.load_opamp_checkpoint(tmp_path / "b")


def test_load_refuses_wrong_adapter_shapes(tmp_path) -> None:  # type: ignore[no-untyped-def]
    write_their_checkpoint(tmp_path, "qwen2", adapter_dim=8, settings={"adapter_dim": 16})
    with pytest.raises(ad.AdapterLoadError,
                       match=r"model\.layers\.0\.self_attn\.k1_adapter\.adapter_down\.weight has shape \(8, 32\), "
                             r"config\.json implies \(16, 32\)"):
        ad.load_opamp_checkpoint(tmp_path)


def test_load_refuses_other_checkpoints(tmp_path) -> None:  # type: ignore[no-untyped-def]
    write_their_checkpoint(tmp_path, "llama")
    meta = json.loads((tmp_path / "config.json").read_text())
    meta["model_type"] = "noisyllama"
    (tmp_path / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ad.AdapterLoadError, match="model_type 'noisyllama'.*accepted: 'opampllama'"):
        ad.load_opamp_checkpoint(tmp_path)
    meta["model_type"] = "opampllama"
    (tmp_path / "config.json").write_text(json.dumps(meta))
    (tmp_path / "model.safetensors").rename(tmp_path / "pytorch_model.bin")
    with pytest.raises(ad.AdapterLoadError, match="pytorch_model.bin: pickle files are not read"):
        ad.load_opamp_checkpoint(tmp_path)
    with pytest.raises(ad.AdapterLoadError, match="no config.json"):
        ad.load_opamp_checkpoint(tmp_path / "nowhere")


def test_loaded_model_saves_as_an_attndenoise_adapter(tmp_path) -> None:  # type: ignore[no-untyped-def]
    base, _, _ = write_their_checkpoint(tmp_path / "theirs", "qwen2")
    model = ad.load_opamp_checkpoint(tmp_path / "theirs")
    ad.save(model, tmp_path / "ours")
    again = ad.load(copy.deepcopy(base), tmp_path / "ours")
    x = inputs(batch=1, length=9)
    with torch.no_grad():
        assert torch.equal(again(x).logits, model(x).logits)

