"""``attndenoise.frozen`` (splitting a causal LM at a decoder layer) and ``TrainConfig.top_layers``.

Every check compares against a reference that does not go through the split:

* ``FrozenPrefix.capture`` + ``replay``: logits equal the same model's full forward (every family, a method on the
  top layers with its parameters moved away from identity, no mask / right / left padding); the captured states
  equal ``output_hidden_states`` of the full forward; the lower layers do not run inside ``replay``; the context
  leaves the model as it was (also after an error inside it).
* ``prefill_rows``: ``generate`` from the returned caches equals ``generate`` without a cache (tokens and the
  logits of every step) for the base and two row models (``copy.deepcopy`` of the base plus a method on the top
  layers), sliding-window families included; ``same_below`` against hand-built cases.
* ``greedy_rows`` (the rows' lower layers decoded as one batch): every row's tokens equal its own ``generate``,
  with rows stopping at different steps (EOS, a stop rule, the token limit) and the base among the rows.
* errors: the accepted ranges of ``first`` / ``k``, a wrong-shape replay, ``check_frozen``.
* ``train(top_layers=k)``: the same loss history (rtol 1e-5) and trained tensors (atol 1e-6; 1e-5 for the 128-wide
  tiny model, see ``EQUIVALENT``) as the full-forward, full-logits path with the method's ``layers`` set to the top
  ``k`` (llama, gpt2, the embedded tiny model), with logits computed at the answer positions only; kinds ``none``
  and ``lora`` train only the top layer and ``load_trained`` on a stock model reproduces the logits; the on-disk
  cache of the lower layers' output is reused (no new files, no lower-layer compute), holds the full forward's
  hidden states, and is keyed by the weights and the split; what cannot be split raises ``TrainError``.
* regressions: four bugs this file found (cache key without the config or the dtype, an instance forward lost by
  ``replay``, GPT-2's position embeddings missing from the frozen set), each with its failing case.

Models are tiny random ones (``tests/models.py``, with 3 or 4 layers here) and a 3-layer random Llama over the
embedded tokenizer; the cache folder is a per-test ``tmp_path`` (``ATTNDENOISE_CACHE``).
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any
from unittest import mock

import models
import pytest
import torch
from matrix import randomize
from safetensors.torch import load_file
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import attndenoise as ad
from attndenoise.cache import CACHE_ENV
from attndenoise.config import ConfigError
from attndenoise.data import SyntheticQA, build_noisy_example, build_tokenizer, collate, encode_for_training
from attndenoise.data.loading import examples_from_records
from attndenoise.frozen import (
    FrozenPrefix,
    FrozenPrefixError,
    cached_hidden,
    decoder_layers,
    greedy_rows,
    prefill_rows,
    same_below,
)
from attndenoise.models import load_model_and_tokenizer
from attndenoise.train import PROJECTIONS_FILE, TrainError, TrainResult

ATOL = 1e-5


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Nothing goes to the user's cache: every test gets its own cache folder."""
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


# -- models ---------------------------------------------------------------------------------------------------------


def deep(family: str, layers: int = 3, seed: int = 0) -> torch.nn.Module:
    """``models.tiny(family)`` with ``layers`` decoder layers (random norms and biases, eval mode)."""

    def gpt2() -> GPT2LMHeadModel:
        return GPT2LMHeadModel(GPT2Config(vocab_size=models.VOCAB, n_embd=32, n_layer=layers, n_head=4,
                                          n_positions=256, pad_token_id=0, eos_token_id=1, bos_token_id=2,
                                          initializer_range=0.1))  # 0.02: near-uniform maps, methods barely act

    with mock.patch.dict(models._COMMON, num_hidden_layers=layers), mock.patch.dict(models.BUILDERS, gpt2=gpt2):
        return models.tiny(family, seed)


def with_method(model: torch.nn.Module, method: str, layers: list[int], seed: int = 5) -> torch.nn.Module:
    """``model`` with ``method`` on ``layers`` (lambda = its learned value) and its parameters randomized."""
    ad.apply(model, ad.config_for(method, layers=layers, anneal_steps=0))
    randomize(model, seed)
    return model.eval()


def masks(x: torch.Tensor) -> dict[str, dict[str, torch.Tensor]]:
    right = torch.ones_like(x)
    right[1, -4:] = 0
    left = torch.ones_like(x)
    left[1, :3] = 0
    return {"none": {}, "right": {"attention_mask": right}, "left": {"attention_mask": left}}


class Calls:
    """Counts the calls of a module's forward (hooked on a submodule the pass-through never reaches)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.batches: list[int] = []
        self.handle = module.register_forward_pre_hook(lambda m, args: self.batches.append(args[0].shape[0]))

    def close(self) -> None:
        self.handle.remove()


def mlp_of(layer: torch.nn.Module) -> torch.nn.Module:
    return layer.mlp


def files(folder: Path) -> dict[str, int]:
    """Every file under ``folder`` -> its modification time."""
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


# -- capture + replay == the full forward ---------------------------------------------------------------------------

SECOND = {"llama": "dint", "gpt2": "opamp", "gemma2": "opamp", "qwen3": "opamp", "phi3": "diff"}
CASES = [(f, "daa") for f in models.FAMILIES] + list(SECOND.items())


@pytest.mark.parametrize("family,method", CASES)
@pytest.mark.parametrize("k", [1, 2])
def test_capture_and_replay_equal_the_full_forward(family: str, method: str, k: int) -> None:
    stock = deep(family)
    model = with_method(copy.deepcopy(stock), method, list(range(-k, 0)))
    split = FrozenPrefix.top(model, k)
    assert split.first == 3 - k and split.top_indices == list(range(3 - k, 3))
    x = models.inputs(2, 12)
    for pad, kw in masks(x).items():
        with torch.no_grad():
            full = model(input_ids=x, output_hidden_states=True, **kw)
            plain = stock(input_ids=x, **kw).logits
            hidden = split.capture(input_ids=x, **kw)
            calls = Calls(mlp_of(split.layers[0]))
            with split.replay(hidden):
                out = model(input_ids=x, **kw).logits
            calls.close()
            after = model(input_ids=x, **kw).logits
        assert (full.logits - plain).abs().max() > 1e-3, "the method must change the logits for the test to mean much"
        torch.testing.assert_close(hidden, full.hidden_states[split.first], atol=0, rtol=0)
        torch.testing.assert_close(out, full.logits, atol=ATOL, rtol=0, msg=lambda m, pad=pad: f"{pad} padding: {m}")
        assert calls.batches == [], "a frozen layer ran inside replay"
        torch.testing.assert_close(after, full.logits, atol=0, rtol=0)  # replay left no trace


def test_replay_carries_gradients_to_the_top_layers_only() -> None:
    """The gradient of the loss through replay equals the full forward's for every top-layer parameter."""
    model = with_method(deep("llama"), "daa", [-1])
    split = FrozenPrefix.top(model, 1)
    x = models.inputs(2, 12)

    def grads(replayed: bool) -> dict[str, torch.Tensor]:
        model.zero_grad()
        if replayed:
            with split.replay(split.capture(input_ids=x)):
                loss = model(input_ids=x, labels=x).loss
        else:
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    full, replayed = grads(False), grads(True)
    top = {n for n in full if ".layers.2." in n or n.startswith(("model.norm", "lm_head"))}
    assert set(replayed) == top and any("attndenoise" in n for n in top)
    for n in top:
        torch.testing.assert_close(replayed[n], full[n], atol=1e-6, rtol=1e-5)


def test_capture_restores_training_mode_and_works_through_peft() -> None:
    from peft import LoraConfig, get_peft_model

    model = deep("llama")
    x = models.inputs(1, 10)
    with torch.no_grad():
        ref = model(input_ids=x, output_hidden_states=True)
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=2, target_modules=["q_proj"]))
    peft_model.train()
    split = FrozenPrefix(peft_model, 2)  # found through the peft wrapper
    assert split.layers is decoder_layers(peft_model.get_base_model())
    hidden = split.capture(input_ids=x)
    assert peft_model.training
    torch.testing.assert_close(hidden, ref.hidden_states[2], atol=ATOL, rtol=0)  # LoRA B = 0 at init
    peft_model.eval()
    with torch.no_grad(), split.replay(hidden):
        out = peft_model(input_ids=x).logits
    torch.testing.assert_close(out, ref.logits, atol=ATOL, rtol=0)


def test_cached_hidden_captures_each_sequence_once_and_reads_it_back(_cache: Path) -> None:
    model = deep("phi3")
    seqs = [[5, 6, 7, 8, 9], [10, 11, 12], [5, 6, 7, 8, 9]]
    with torch.no_grad():
        want = [model(input_ids=torch.tensor([s]), output_hidden_states=True).hidden_states for s in seqs]
    split = FrozenPrefix.top(model, 1)
    calls = Calls(mlp_of(split.layers[0]))
    got = cached_hidden(split, seqs)
    assert calls.batches == [1, 1]  # the repeated sequence is captured once
    assert len(files(_cache)) == 2
    again = cached_hidden(split, seqs)
    assert calls.batches == [1, 1]  # all read from disk
    calls.close()
    for g, a, w in zip(got, again, want, strict=True):
        torch.testing.assert_close(g, w[2][0], atol=0, rtol=0)
        torch.testing.assert_close(a, w[2][0], atol=0, rtol=0)
    lower = cached_hidden(FrozenPrefix.top(model, 2), seqs)  # another split: its own entry
    assert len(list((_cache / "frozen").iterdir())) == 2
    for g, w in zip(lower, want, strict=True):
        torch.testing.assert_close(g, w[1][0], atol=0, rtol=0)


# -- prefill_rows + generate == generate --------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2", "mistral", "qwen3"])
def test_prefill_rows_generate_equals_generate_without_the_cache(family: str) -> None:
    base, first = deep(family, layers=4), 2
    rows = {"a": with_method(copy.deepcopy(base), "daa", [2, 3], seed=5),
            "b": with_method(copy.deepcopy(base), "dint", [2, 3], seed=6)}
    prompt = models.inputs(1, 14, seed=3)  # longer than the sliding window (6) of mistral / gemma2
    gen = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False, pad_token_id=0,
               return_dict_in_generate=True, output_logits=True)
    refs = {name: m.generate(input_ids=prompt, **gen) for name, m in [("base", base), *rows.items()]}
    base_cache, caches = prefill_rows(base, rows, prompt[:, :-1], first)
    assert set(caches) == {"a", "b"}
    # The base decodes first: its cache shares the lower layers' tensors with the rows', which must stay intact.
    for name, m, cache in [("base", base, base_cache), ("a", rows["a"], caches["a"]), ("b", rows["b"], caches["b"])]:
        out = m.generate(input_ids=prompt, past_key_values=cache, **gen)
        ref = refs[name]
        assert len(out.logits) == len(ref.logits) == 8
        for step, (got, want) in enumerate(zip(out.logits, ref.logits, strict=True)):
            torch.testing.assert_close(got, want, atol=ATOL, rtol=0, msg=lambda m, s=step, r=name: f"{r} step {s}: {m}")
        assert torch.equal(out.sequences, ref.sequences), name
    # The rows differ from the base at the first step, so a cache mix-up would show.
    for name in rows:
        assert (refs[name].logits[0] - refs["base"].logits[0]).abs().max() > 1e-3


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2", "mistral", "qwen3"])
def test_greedy_rows_equal_each_models_own_generate(family: str) -> None:
    base, first = deep(family, layers=4), 2
    rows = {"base": base, "a": with_method(copy.deepcopy(base), "daa", [2, 3], seed=5),
            "b": with_method(copy.deepcopy(base), "dint", [2, 3], seed=6),
            "c": with_method(copy.deepcopy(base), "opamp", [3], seed=7)}
    prompt = models.inputs(1, 14, seed=3)  # longer than the sliding window (6) of mistral / gemma2
    plain = {n: m.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=10,
                           do_sample=False, pad_token_id=0)[0, prompt.shape[1]:].tolist() for n, m in rows.items()}
    # An EOS that one row emits early, so rows finish at different steps and the batch keeps running without it.
    eos = plain["a"][3]
    want = {n: seq[: seq.index(eos) + 1] if eos in seq else seq for n, seq in plain.items()}
    got = greedy_rows(base, rows, prompt, first, max_new_tokens=10, eos=[eos])
    assert got == want
    assert len({len(v) for v in want.values()}) > 1, "the case should have rows stopping at different steps"
    # A stop rule on the new tokens (here: the third token) ends every row there, as a stopping criterion would.
    short = greedy_rows(base, rows, prompt, first, max_new_tokens=10, eos=[-1], stop=lambda ids: len(ids) == 3)
    assert short == {n: seq[:3] for n, seq in plain.items()}


def test_greedy_rows_with_a_row_of_its_own_output_head() -> None:
    """Rows whose head equals the base's share one batched head call per step; a row with its own (trained) head
    runs in full. Both agree with each model's own ``generate``."""
    base, first = deep("llama", layers=4), 2  # untied embeddings: the head can differ while the layers below agree
    own = with_method(copy.deepcopy(base), "daa", [2, 3], seed=5)
    with torch.no_grad():
        own.lm_head.weight.add_(0.05 * torch.randn_like(own.lm_head.weight))
    rows = {"base": base, "own": own, "a": with_method(copy.deepcopy(base), "dint", [2, 3], seed=6)}
    prompt = models.inputs(1, 14, seed=4)
    plain = {n: m.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8,
                           do_sample=False, pad_token_id=0)[0, prompt.shape[1]:].tolist() for n, m in rows.items()}
    assert plain["own"] != plain["base"]
    assert greedy_rows(base, rows, prompt, first, max_new_tokens=8, eos=[-1]) == plain


def test_greedy_rows_takes_one_prompt() -> None:
    base = deep("llama")
    for bad in (models.inputs(2, 8), models.inputs(1, 1)):
        with pytest.raises(ValueError, match="one prompt of at least two tokens"):
            greedy_rows(base, {"base": base}, bad, 1, max_new_tokens=4, eos=[0])


def test_prefill_rows_takes_one_unpadded_prompt() -> None:
    base = deep("llama")
    with pytest.raises(ValueError, match="one prompt"):
        prefill_rows(base, {}, models.inputs(2, 8), 1)


def test_same_below() -> None:
    base = deep("llama", layers=4)
    row = with_method(copy.deepcopy(base), "daa", [2, 3])
    assert same_below(base, row, 2) and same_below(base, copy.deepcopy(base), 3)
    assert not same_below(base, row, 3)  # the method's parameters sit in layer 2, below a split at 3
    other = copy.deepcopy(base)
    with torch.no_grad():
        other.model.layers[1].mlp.down_proj.weight[0, 0] += 1e-3
    assert not same_below(base, other, 2) and same_below(base, other, 1)
    emb = copy.deepcopy(base)
    with torch.no_grad():
        emb.model.embed_tokens.weight[5, 0] += 1e-3
    assert not same_below(base, emb, 1)


# -- errors ---------------------------------------------------------------------------------------------------------


def test_split_outside_the_accepted_range_raises() -> None:
    model = deep("llama")  # 3 layers: k and first in 1 .. 2
    for k in (0, 3, 4, -1, True, 1.0):
        with pytest.raises(FrozenPrefixError, match=r"top_layers=.*accepted 1 \.\. 2 for this 3-layer model"):
            FrozenPrefix.top(model, k)  # type: ignore[arg-type]
    for first in (0, 3, True):
        with pytest.raises(FrozenPrefixError, match=r"first=.*accepted: 1 \.\. 2 for this 3-layer model"):
            FrozenPrefix(model, first)  # type: ignore[arg-type]
    assert FrozenPrefix.top(model, 2).first == 1 and FrozenPrefix.top(model, 1).first == 2


def test_replay_with_hidden_states_of_other_inputs_raises_and_leaves_the_model_intact() -> None:
    model = deep("gpt2")
    split = FrozenPrefix.top(model, 1)
    x = models.inputs(2, 12)
    with torch.no_grad():
        ref = model(input_ids=x).logits
        hidden = split.capture(input_ids=x)
        for bad in (x[:, :10], x[:1]):
            with pytest.raises(FrozenPrefixError, match=r"captured hidden states have shape \(2, 12, 32\)"), \
                    split.replay(hidden):
                model(input_ids=bad)
        torch.testing.assert_close(model(input_ids=x).logits, ref, atol=0, rtol=0)


def test_check_frozen_raises_when_a_lower_parameter_trains() -> None:
    model = deep("qwen2")
    for p in model.parameters():
        p.requires_grad_(False)
    split = FrozenPrefix.top(model, 1)
    for p in decoder_layers(model)[2].parameters():  # above the split: fine
        p.requires_grad_(True)
    model.lm_head.weight.requires_grad_(True)
    split.check_frozen()
    model.model.layers[1].self_attn.k_proj.bias.requires_grad_(True)
    with pytest.raises(FrozenPrefixError, match=r"1 parameter\(s\) below layer 2 would train "
                                                r"\(e\.g\. model\.layers\.1\.self_attn\.k_proj\.bias\)"):
        split.check_frozen()
    model.model.layers[1].self_attn.k_proj.bias.requires_grad_(False)
    model.model.embed_tokens.weight.requires_grad_(True)
    with pytest.raises(FrozenPrefixError, match="model.embed_tokens.weight"):
        split.check_frozen()


# -- training with top_layers ---------------------------------------------------------------------------------------

TOK = build_tokenizer()
_EXAMPLES = [build_noisy_example(e, 0.5, rng=i) for i, e in enumerate(SyntheticQA(3, split="test").examples(8))]
RECORDS = [{"documents": list(e.documents), "gold": list(e.gold), "question": e.question, "answer": e.answer}
           for e in _EXAMPLES]


def llama(layers: int = 3, seed: int = 0, tie: bool = False, **cfg: Any) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(TOK), hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, pad_token_id=0,
                         bos_token_id=2, eos_token_id=3, tie_word_embeddings=tie, **cfg)
    return LlamaForCausalLM(config).eval()


def gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)  # no dropout: the reference path would drop out in the lower layers too
    return GPT2LMHeadModel(GPT2Config(vocab_size=len(TOK), n_embd=32, n_layer=3, n_head=4, n_positions=1024,
                                      pad_token_id=0, bos_token_id=2, eos_token_id=3, resid_pdrop=0.0,
                                      embd_pdrop=0.0, attn_pdrop=0.0)).eval()


def tiny_model() -> torch.nn.Module:
    return load_model_and_tokenizer("tiny")[0]  # the embedded model: 2 layers, tied embeddings


def run(model: torch.nn.Module, out: Path, tokenizer: Any = TOK, **kw: Any) -> TrainResult:
    # lr 1e-3: Adam divides by the gradient's own size, so float rounding in a near-zero gradient entry moves that
    # entry by up to ~lr / 3000 between two exact computations; at 1e-3 that stays under the 1e-6 compared.
    opts = dict(data=RECORDS, steps=4, batch_size=2, learning_rate=1e-3, max_length=256, save_steps=100,
                logging_steps=1, progress=False, seed=0)
    return ad.train(model=model, tokenizer=tokenizer, out=str(out), **{**opts, **kw})


def losses(result: TrainResult) -> list[float]:
    return [h["loss"] for h in result.run["loss_history"]]


def batch(tokenizer: Any = TOK) -> dict[str, torch.Tensor]:
    """All 8 training examples, padded (encoded here, not by the training code)."""
    feats = [encode_for_training(e, tokenizer) for e in examples_from_records(RECORDS)]
    return {k: v for k, v in collate(feats, tokenizer.pad_token_id).items() if k != "labels"}


def logits(model: torch.nn.Module, tokenizer: Any = TOK) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**batch(tokenizer)).logits


def tiny_tokenizer() -> Any:
    return load_model_and_tokenizer("tiny")[1]


# name: (model builder, tokenizer builder, top layers, train options besides the split, atol of the trained tensors)
EQUIVALENT: dict[str, tuple[Any, Any, int, dict[str, Any], float]] = {
    "llama-daa-attention": (llama, build_tokenizer, 1, dict(method="daa", attention=True), 1e-6),
    "llama-dint-top2": (llama, build_tokenizer, 2, dict(method="dint"), 1e-6),
    "llama-lm_head-grad_accum": (llama, build_tokenizer, 1, dict(method="daa", attention=True, lm_head=True,
                                                                 grad_accum=2, batch_size=1), 1e-6),
    "gpt2-daa-attention": (gpt2, build_tokenizer, 1, dict(method="daa", attention=True), 1e-6),
    # 128 wide: the full path itself, regrouped as batch 1 x grad_accum 2 (the same sum), moves the trained tensors
    # by up to 6e-6 here (float rounding through Adam); the split stays within 5e-6 of it, the update is 2.5e-3.
    "tiny-daa-attention": (tiny_model, tiny_tokenizer, 1, dict(method="daa", attention=True), 1e-5),
}


@pytest.mark.parametrize("case", list(EQUIVALENT))
def test_top_layers_trains_as_the_full_forward_does(case: str, tmp_path: Path) -> None:
    build, tokenizer, k, kw, atol = EQUIVALENT[case]
    tok = tokenizer()
    widths: dict[str, list[int]] = {"split": [], "full": []}
    models_ = {"split": build(), "full": build()}
    for name, m in models_.items():  # the positions lm_head computes logits at, per training forward
        m.get_output_embeddings().register_forward_pre_hook(lambda mod, a, w=widths[name]: w.append(a[0].shape[1]))
    split = run(models_["split"], tmp_path / "split", tok, top_layers=k, **kw)
    full = run(models_["full"], tmp_path / "full", tok, method_options={"layers": list(range(-k, 0))}, **kw)
    # Logits only where the loss reads them (the answer tokens, 1-2 per example) instead of at all ~64 tokens.
    assert len(widths["split"]) == len(widths["full"]) and max(widths["split"]) <= 4 < 32 < min(widths["full"])
    assert [h["step"] for h in split.run["loss_history"]] == [1, 2, 3, 4]
    torch.testing.assert_close(losses(split), losses(full), rtol=1e-5, atol=0)
    assert split.run["method_config"]["layers"] == full.run["method_config"]["layers"]
    # Something trained: the method starts as the identity, so an untrained run would give the stock logits.
    assert (logits(full.model, tok) - logits(build(), tok)).abs().max() > 1e-4
    got, want = split.model.state_dict(), full.model.state_dict()
    assert set(got) == set(want)
    for n in want:
        torch.testing.assert_close(got[n], want[n], atol=atol, rtol=1e-5, msg=lambda m, n=n: f"{n}: {m}")


PROJ = re.compile(r"model\.layers\.(\d+)\.self_attn\.[qkvo]_proj\.weight")


def test_none_trains_only_the_top_layers_projections_and_loads_back(tmp_path: Path) -> None:
    result = run(llama(), tmp_path / "none", method="none", top_layers=1)
    ref = dict(llama().named_parameters())
    trained = dict(result.model.named_parameters())
    top = {n for n in ref if (m := PROJ.fullmatch(n)) and m.group(1) == "2"}
    assert len(top) == 4
    assert {n for n, p in trained.items() if p.requires_grad} == top
    assert {n for n, p in trained.items() if not torch.equal(p, ref[n])} == top
    assert set(load_file(str(tmp_path / "none" / PROJECTIONS_FILE))) == top
    loaded = ad.load_trained(llama(), result.out_dir)
    torch.testing.assert_close(logits(loaded), logits(result.model), atol=ATOL, rtol=0)


def test_lora_sits_in_the_top_layer_only_and_loads_back(tmp_path: Path) -> None:
    result = run(llama(), tmp_path / "lora", method="lora", lora_rank=4, top_layers=1)
    names = [n for n, _ in result.model.named_parameters() if "lora_" in n]
    assert names and all(".layers.2.self_attn." in n for n in names)
    assert {n.split(".self_attn.")[1].split(".")[0] for n in names} == {"q_proj", "k_proj", "v_proj", "o_proj"}
    b = [p for n, p in result.model.named_parameters() if "lora_B" in n]
    assert any(p.abs().max() > 0 for p in b), "the LoRA did not train"
    loaded = ad.load_trained(llama(), result.out_dir)
    torch.testing.assert_close(logits(loaded), logits(result.model), atol=ATOL, rtol=0)


def test_lower_layers_run_once_per_example_and_the_cache_is_reused(tmp_path: Path, _cache: Path) -> None:
    model = llama()
    calls = Calls(mlp_of(model.model.layers[0]))
    run(model, tmp_path / "first", method="none", top_layers=1, steps=8)  # 16 examples read, 8 distinct
    calls.close()
    assert calls.batches == [1] * 8
    folders = sorted((_cache / "frozen").iterdir())
    assert len(folders) == 1
    before = files(_cache)
    assert len(before) == 8

    # What is cached is what the full forward feeds layer 2 (matched by content, not by file name).
    with torch.no_grad():
        feats = [encode_for_training(e, TOK) for e in examples_from_records(RECORDS)]
        want = [llama()(input_ids=torch.tensor([f.input_ids]), output_hidden_states=True).hidden_states[2][0]
                for f in feats]
    for path in folders[0].iterdir():
        h = load_file(str(path))["hidden"]
        assert any(h.shape == w.shape and torch.allclose(h, w, atol=1e-6, rtol=0) for w in want), path.name

    again = llama()  # the same weights, another run on the same data: nothing recomputed or rewritten
    calls = Calls(mlp_of(again.model.layers[0]))
    run(again, tmp_path / "second", method="daa", attention=True, top_layers=1, seed=0)
    calls.close()
    assert calls.batches == [] and files(_cache) == before

    run(llama(seed=1), tmp_path / "other", method="none", top_layers=1)  # other weights: their own entry
    assert len(list((_cache / "frozen").iterdir())) == 2
    assert len(files(_cache)) == 16


def test_what_cannot_be_split_raises(tmp_path: Path) -> None:
    model, tok = load_model_and_tokenizer("tiny")  # tied embeddings: lm_head is the input embedding matrix
    with pytest.raises(TrainError, match=r"ties lm_head to its input embeddings"):
        run(model, tmp_path / "tied", tok, method="daa", attention=True, lm_head=True, top_layers=1)
    with pytest.raises(TrainError, match="freezes the layers below 2, but the method patches layer 0"):
        run(llama(), tmp_path / "low", method="daa", method_options={"layers": [0]}, top_layers=1)
    with pytest.raises(TrainError, match=r"top_layers=3: accepted 1 \.\. 2 for this 3-layer model"):
        run(llama(), tmp_path / "all", method="none", top_layers=3)
    with pytest.raises(ConfigError, match="top_layers=0"):
        run(llama(), tmp_path / "zero", method="none", top_layers=0)
    assert not any((tmp_path / d).exists() for d in ("tied", "low", "all", "zero"))


# -- regressions ----------------------------------------------------------------------------------------------------


def test_cache_is_keyed_by_the_config_not_only_the_weights(tmp_path: Path) -> None:
    run(llama(), tmp_path / "plain", method="none", top_layers=1)  # fills the cache for these weights

    def rope100() -> LlamaForCausalLM:
        m = llama(rope_parameters={"rope_type": "default", "rope_theta": 100.0})
        m.load_state_dict(llama().state_dict())
        return m

    kw = dict(method="daa", attention=True)
    split = run(rope100(), tmp_path / "split", top_layers=1, **kw)
    full = run(rope100(), tmp_path / "full", method_options={"layers": [-1]}, **kw)
    torch.testing.assert_close(losses(split), losses(full), rtol=1e-5, atol=0)


def test_cache_is_keyed_by_the_dtype(tmp_path: Path) -> None:
    def rounded() -> LlamaForCausalLM:  # weights exactly representable in bfloat16: one value in both dtypes
        m = llama()
        with torch.no_grad():
            for p in m.parameters():
                p.copy_(p.to(torch.bfloat16).float())
        return m

    kw = dict(method="daa", attention=True)
    run(rounded().to(torch.bfloat16), tmp_path / "bf16", top_layers=1, **kw)
    split = run(rounded(), tmp_path / "split", top_layers=1, **kw)
    full = run(rounded(), tmp_path / "full", method_options={"layers": [-1]}, **kw)
    got, want = split.model.state_dict(), full.model.state_dict()
    for n in want:
        torch.testing.assert_close(got[n], want[n], atol=1e-6, rtol=1e-5, msg=lambda m, n=n: f"{n}: {m}")


def test_replay_restores_an_instance_forward_of_a_lower_layer() -> None:
    from accelerate.hooks import ModelHook, add_hook_to_module

    class Count(ModelHook):
        calls = 0

        def pre_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
            Count.calls += 1
            return args, kwargs

    model = deep("llama")
    add_hook_to_module(model.model.layers[0], Count())
    x = models.inputs(1, 8)
    split = FrozenPrefix.top(model, 1)
    with torch.no_grad():
        with split.replay(split.capture(input_ids=x)):
            model(input_ids=x)
        before = Count.calls
        model(input_ids=x)
    assert Count.calls == before + 1, "the accelerate hook of layer 0 no longer runs after replay"


def test_check_frozen_sees_gpt2_position_embeddings() -> None:
    model = deep("gpt2")
    for p in model.parameters():
        p.requires_grad_(False)
    model.transformer.wpe.weight.requires_grad_(True)
    with pytest.raises(FrozenPrefixError):
        FrozenPrefix.top(model, 1).check_frozen()
