"""The embedded tiny model: cache, atomic builds, save/load, determinism, and that pretraining learns."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

import attndenoise.tiny as tiny
from attndenoise.data import SyntheticQA, build_noisy_example, build_tokenizer, collate, encode_for_training
from attndenoise.tiny import METADATA_FILE, TinyConfig, pretrain_tiny, sequence_loss, tiny_model_path

# Small enough to build in a second or two on 2 cores.
SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=64, batch_size=8, steps=40, warmup_steps=5, max_position_embeddings=512,
             induction_steps=5, learning_rate=3e-3)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # One thread: bit-identical rebuilds on this machine (see test_thread_count_changes_weights_only_at_round_off),
    # and much faster than two when other processes load the cores.
    return tiny_model_path(tmp_path_factory.mktemp("cache"), threads=1, **SMALL)


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def held_out_batch(tokenizer: object) -> dict[str, torch.Tensor]:
    exs = [build_noisy_example(e, 0.5, rng=i) for i, e in enumerate(SyntheticQA(0, split="test").examples(16))]
    return collate([encode_for_training(e, tokenizer) for e in exs], tokenizer.pad_token_id)  # type: ignore[attr-defined]


def test_cache_layout_and_reuse(built: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert built.name == f"tiny-{TinyConfig(**SMALL).version_hash()}"
    meta = json.loads((built / METADATA_FILE).read_text())
    assert meta["config"]["steps"] == 40 and meta["hash"] == TinyConfig(**SMALL).version_hash()
    # no temporary directory left behind (the builders' lock file stays, empty)
    assert [p.name for p in built.parent.iterdir() if not p.name.endswith(".lock")] == [built.name]

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("a cached model must not be rebuilt")

    monkeypatch.setattr(tiny, "pretrain_tiny", fail)
    assert tiny_model_path(built.parent, threads=1, **SMALL) == built


def test_hash_covers_every_setting() -> None:
    base = TinyConfig(**SMALL)
    assert TinyConfig(**{**SMALL, "seed": 1}).version_hash() != base.version_hash()
    assert TinyConfig(**{**SMALL, "steps": 41}).version_hash() != base.version_hash()
    assert TinyConfig(**SMALL).version_hash() == base.version_hash()
    with pytest.raises(ValueError, match="multiple of num_key_value_heads"):
        TinyConfig(num_attention_heads=4, num_key_value_heads=3)


def test_env_var_sets_the_cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ATTNDENOISE_CACHE", str(tmp_path / "env-cache"))
    path = tiny_model_path(threads=1, **{**SMALL, "steps": 0})
    assert path.parent == tmp_path / "env-cache" and (path / METADATA_FILE).exists()


def test_interrupted_build_leaves_no_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = tiny.pretrain_tiny

    def interrupted(out_dir: Path, **kwargs: object) -> Path:
        real(out_dir, **kwargs)  # type: ignore[arg-type]
        raise KeyboardInterrupt  # after the files are written, before the rename

    monkeypatch.setattr(tiny, "pretrain_tiny", interrupted)
    with pytest.raises(KeyboardInterrupt):
        tiny_model_path(tmp_path, threads=1, **{**SMALL, "steps": 0})
    assert [p for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []


def test_loads_like_any_model(built: Path, tmp_path: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(built).eval()
    tok = AutoTokenizer.from_pretrained(built)
    assert isinstance(model, LlamaForCausalLM)
    cfg = model.config
    assert cfg.num_key_value_heads < cfg.num_attention_heads  # grouped-query attention
    assert (cfg.vocab_size, cfg.eos_token_id, cfg.pad_token_id) == (len(tok), tok.eos_token_id, tok.pad_token_id)
    batch = held_out_batch(tok)
    # Reference: a model built from the saved config with the saved tensors loaded by hand.
    ref = LlamaForCausalLM(LlamaConfig.from_pretrained(built)).eval()
    missing, unexpected = ref.load_state_dict(weights(built), strict=False)
    assert unexpected == [] and set(missing) <= {"lm_head.weight"}  # tied to the embeddings
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        expected = ref(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.equal(logits, expected)
    # save_pretrained / from_pretrained again: identical logits.
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(again(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, logits)
    out = model.generate(input_ids=batch["input_ids"][:1, :5], max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert out.shape == (1, 8)


def test_same_seed_same_weights(built: Path, tmp_path: Path) -> None:
    again = pretrain_tiny(tmp_path / "again", threads=1, **SMALL)
    a, b = weights(built), weights(again)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    other = pretrain_tiny(tmp_path / "other", threads=1, **{**SMALL, "seed": 1, "steps": 0})
    c = weights(other)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_pretraining_lowers_the_loss(built: Path, tmp_path: Path) -> None:
    init = pretrain_tiny(tmp_path / "init", threads=1, **{**SMALL, "steps": 0})  # same seed: the same initial weights
    tok = AutoTokenizer.from_pretrained(built)
    batch = held_out_batch(tok)
    losses = {}
    for name, path in (("init", init), ("trained", built)):
        model = AutoModelForCausalLM.from_pretrained(path).eval()
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        losses[name] = sequence_loss(logits, batch["labels"]).item()
    assert losses["trained"] < losses["init"] - 1.0, losses
    meta = json.loads((built / METADATA_FILE).read_text())
    assert meta["loss_last"] < meta["loss_first"]


def test_repeat_drill_comes_first_and_trains_only_the_repeat() -> None:
    tok = build_tokenizer()
    cfg = TinyConfig(**{**SMALL, "induction_steps": 2, "batch_size": 4})
    batches = tiny._Mixture(cfg, tok).batches()
    for _ in range(cfg.induction_steps):
        batch = next(batches)
        for ids, labels, mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"], strict=True):
            ids = ids[mask.bool()].tolist()
            n = (len(ids) - 2) // 2
            assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id and ids[1:n + 1] == ids[n + 1:-1]
            assert cfg.repeat_min_len <= n <= cfg.repeat_max_len
            assert not set(ids[1:-1]) & set(tok.all_special_ids)
            target = labels[mask.bool()].tolist()
            # Nothing of the first copy is a target (it cannot be predicted); the repeat and EOS are.
            assert target[: n + 1] == [-100] * (n + 1) and target[n + 1:] == ids[n + 1:]
    # After the drill the mixture follows: QA answers appear (labels with ignored prompt tokens before them).
    later = [next(batches) for _ in range(4)]
    question = tok.convert_tokens_to_ids("Question")
    assert any((b["input_ids"] == question).any() for b in later)


@pytest.mark.parametrize("bad", [{"document_style": "prose"}, {"mix_qa": 0.8, "mix_repeat": 0.3},
                                 {"mix_repeat": -0.1}, {"induction_steps": -1}, {"repeat_min_len": 0},
                                 {"repeat_min_len": 9, "repeat_max_len": 8}])
def test_config_rejects(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        TinyConfig(**bad)  # type: ignore[arg-type]


#: Largest |w(1 thread) - w(2 threads)| allowed per tensor, relative to that tensor's largest |w|. The thread count
#: changes how float32 sums are split (matmul and reduction kernels, which also differ between AVX2 and AVX-512/AMX
#: CPUs), so gradients differ by reduction-order round-off, about sqrt(K) * 6e-8 relative for K-term sums (K ~ 10^3
#: here: ~2e-6). AdamW turns that into ~lr * 2e-6 per step (lr <= 1.8e-3 in these 3 warm-up steps), plus half an ulp
#: of the weight per step: a few 1e-8 absolute after 3 steps. Measured: 4.7e-8 on an Intel Xeon with AVX-512/AMX
#: (at most 8e-7 of any tensor's scale, the smallest being ~0.06), 0 on an AMD EPYC. 1e-5 leaves >= 10x margin over
#: that and is still ~300x below the smallest change the 3 steps make (norm weights move 3.4e-3 of their scale),
#: so a build that trains differently (a skipped step, other data or seed) cannot pass.
THREAD_RTOL = 1e-5


def test_thread_count_changes_weights_only_at_round_off(tmp_path: Path) -> None:
    """Same machine and thread count: bit-identical. 1 vs 2 threads: equal up to float32 reduction order only
    (never bit-equality across thread counts or CPU models: kernels split sums differently)."""
    few = {**SMALL, "steps": 3}
    one = weights(pretrain_tiny(tmp_path / "one", threads=1, **few))
    again = weights(pretrain_tiny(tmp_path / "again", threads=1, **few))
    two = weights(pretrain_tiny(tmp_path / "two", threads=2, **few))
    assert one.keys() == again.keys() == two.keys()
    assert all(torch.equal(one[k], again[k]) for k in one)
    for k in one:
        diff = float((one[k] - two[k]).abs().max())
        scale = float(one[k].abs().max())
        assert diff <= THREAD_RTOL * scale, f"{k}: 1 vs 2 threads differ by {diff:.3g} (scale {scale:.3g})"
    init = weights(pretrain_tiny(tmp_path / "init", threads=1, **{**few, "steps": 0}))
    # not vacuous: every tensor moves far more than the tolerance in these 3 steps
    assert all(float((one[k] - init[k]).abs().max()) > 100 * THREAD_RTOL * float(one[k].abs().max()) for k in one)


def test_shipped_model_is_the_default_build_and_has_learned(monkeypatch: pytest.MonkeyPatch) -> None:
    """The package ships the default model (so nothing builds it), for the current settings and code version."""
    shipped = tiny.packaged_model_path()
    assert shipped is not None, "src/attndenoise/assets lacks tiny-<hash> for TinyConfig(): run attndenoise build-tiny"
    meta = json.loads((shipped / METADATA_FILE).read_text())
    assert meta["hash"] == TinyConfig().version_hash() and meta["tiny_version"] == tiny.TINY_VERSION

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("the shipped model must not be rebuilt")

    monkeypatch.setattr(tiny, "pretrain_tiny", fail)
    assert tiny_model_path() == shipped
    # It answers held-out questions from the gold document alone (an independent check that these are trained
    # weights: a random model of this size scores 0 here).
    from attndenoise.evaluate import evaluate_noisy_qa

    model = AutoModelForCausalLM.from_pretrained(shipped).eval()
    tok = AutoTokenizer.from_pretrained(shipped)
    [res] = evaluate_noisy_qa(model, tok, noise_ratios=(0.0,), n=40, seed=3)
    assert res.exact_match >= 0.9
    torch.manual_seed(0)
    untrained = LlamaForCausalLM(model.config).eval()
    [chance] = evaluate_noisy_qa(untrained, tok, noise_ratios=(0.0,), n=40, seed=3)
    assert chance.exact_match <= 0.1
