"""attndenoise with the libraries its users already use: peft (both orders of wrapping, merging), TRL, DDP, accelerate,
torch.compile, whole-model save/load, the Hub (a local cache, no network), TensorBoard logging, ``python -m``.

References are independent of the code under test: tensors compared before and after one optimiser step (what
changed is read from the tensors, what should change from their names), the logits of a model before a peft merge,
the stock model, adapter files written by hand, TensorBoard's own event reader.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from matrix import plain, randomize
from models import VOCAB, inputs, tiny
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file

import attndenoise as ad

ALL_METHODS = sorted(ad.METHODS)
TARGETS = {"llama": ["q_proj", "k_proj", "v_proj", "o_proj"], "phi3": ["qkv_proj", "o_proj"], "gpt2": ["c_attn"]}


def _patched(family: str = "llama", method: str = "daa") -> torch.nn.Module:
    """The method's first row of the test table (tests/matrix.py) at lambda = its learned value, randomized. On these
    tiny random models SRA edits nothing (its rule selects no row of near-uniform maps): its rows here check that
    it runs alongside each library, not its numbers (tests/test_sra.py does, on peaky models)."""
    case = plain(method)
    model = tiny(family)
    ad.apply(model, case.config(anneal_steps=0))
    if case.trainable:
        randomize(model)
    return model


def _lora(model: torch.nn.Module, family: str = "llama", seed: int = 3) -> Any:
    """A peft LoRA on the attention projections with random (non-zero) B, so it changes the outputs."""
    pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[family],
                                          fan_in_fan_out=family == "gpt2"))
    _randomize_lora(pm, seed)
    return pm


def _randomize_lora(model: torch.nn.Module, seed: int = 3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _one_step(model: torch.nn.Module) -> None:
    """One AdamW step (no weight decay: only parameters with a gradient can move) on a language-model loss."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
    x = inputs()
    model(input_ids=x, labels=x).loss.backward()
    opt.step()
    model.eval()


def _changed(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> set[str]:
    return {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}


def _kind(name: str) -> str:
    return "method" if ".attndenoise." in name else "lora" if "lora_" in name else "base"


# -- peft: both orders ---------------------------------------------------------------------------------------------


def test_peft_after_method_refuses_silently_frozen_method_then_trains_both() -> None:
    pm = _lora(_patched())
    pm.train()
    x = inputs()
    with pytest.raises(ad.MethodFrozenError, match="set_trainable"):
        pm(input_ids=x, labels=x)
    ad.set_trainable(pm)
    before = _snapshot(pm)
    _one_step(pm)
    changed = _changed(pm, before)
    kinds = {n: _kind(n) for n in before}
    assert {kinds[n] for n in changed} == {"method", "lora"}
    assert changed == {n for n, k in kinds.items() if k != "base"}  # every method and LoRA tensor, no base tensor


def test_set_trainable_false_trains_the_lora_alone() -> None:
    pm = _lora(_patched())
    ad.set_trainable(pm, False)
    before = _snapshot(pm)
    _one_step(pm)
    assert {_kind(n) for n in _changed(pm, before)} == {"lora"}


@pytest.mark.parametrize("target", ["peft_model", "base_model"])
def test_method_after_peft_keeps_the_lora_trainable(target: str) -> None:
    pm = _lora(tiny("llama"))
    ad.apply(pm if target == "peft_model" else pm.get_base_model(), ad.config_for("daa", anneal_steps=0))
    randomize(pm)
    before = _snapshot(pm)
    _one_step(pm)
    changed = _changed(pm, before)
    assert changed == {n for n in before if _kind(n) != "base"}
    ad.remove(pm)  # through the wrapper; the LoRA is untouched and still trainable
    assert all(p.requires_grad for n, p in pm.named_parameters() if "lora_" in n)


def test_trl_sft_with_peft_config_trains_the_method_or_refuses() -> None:
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    tok = _tokenizer()
    ds = Dataset.from_dict({"text": [" ".join(f"w{(i * 7 + j) % 90 + 4}" for j in range(10)) for i in range(8)]})

    def trainer(tmp: str, callbacks: list[Any]) -> Any:
        args = trl.SFTConfig(output_dir=tmp, max_steps=1, per_device_train_batch_size=4, learning_rate=1e-2,
                             report_to=[], use_cpu=True, save_strategy="no", logging_steps=1, max_length=16,
                             weight_decay=0.0, disable_tqdm=True, bf16=False)
        return trl.SFTTrainer(model=_patched(), args=args, train_dataset=ds, processing_class=tok,
                              peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), callbacks=callbacks)

    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        tr = trainer(tmp, [ad.LambdaCallback()])
        _randomize_lora(tr.model)  # B = 0 would leave A without a gradient in one step
        before = _snapshot(tr.model)
        tr.train()
        changed = _changed(tr.model, before)
        assert {_kind(n) for n in changed} == {"method", "lora"}
        assert any("lambda/" in k for k in tr.state.log_history[0])
        with pytest.raises(ad.MethodFrozenError):
            trainer(tmp, []).train()  # no callback: the frozen method is refused, not silently skipped


# -- merging a LoRA under a method ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "family,method",
    [("llama", m) for m in ALL_METHODS] + [(f, m) for f in ("phi3", "gpt2") for m in ("diffq", "diffv", "diff")],
)
def test_lora_merge_leaves_every_method_unchanged(family: str, method: str) -> None:
    model = _patched(family, method)
    pm = _lora(model, family)
    x = inputs()
    with torch.no_grad():
        before = pm(x).logits
        with pm.disable_adapter():
            no_lora = pm(x).logits
        merged = pm.merge_and_unload()
        after = merged(x).logits
    assert (before - no_lora).abs().max() > 1e-2  # the LoRA matters, so a method reading W without it would move
    torch.testing.assert_close(after, before, atol=1e-5, rtol=0)
    assert merged is model and ad.method_modules(merged)  # the method survives the merge on the same model


def test_second_projections_copy_the_effective_projection() -> None:
    # DIFF applied over a LoRA starts with A2 = A1 (copies of W + BA); with lambda != 0 the method's output then
    # equals (1 - lambda) O1, which the stock attention of the LoRA model gives when scaled by hand.
    pm = _lora(tiny("llama"))
    ad.apply(pm, ad.config_for("diff", anneal_steps=0))
    for i, m in ad.method_modules(pm).items():
        attn = m.proj2  # type: ignore[union-attr]
        q = pm.get_base_model().model.layers[i].self_attn.q_proj
        with torch.no_grad():
            w_eff = q.base_layer.weight + q.scaling["default"] * q.lora_B["default"].weight @ q.lora_A["default"].weight
        torch.testing.assert_close(attn.q_weight, w_eff, atol=1e-6, rtol=0)


def test_method_merge_under_a_lora_is_refused_then_works_after_merging_the_lora() -> None:
    pm = _lora(_patched("llama", "dex"))
    with pytest.raises(ad.NotMergeableError, match="merge_and_unload"):
        ad.merge(pm)
    x = inputs()
    with torch.no_grad():
        ref = pm(x).logits
        model = ad.merge(pm.merge_and_unload())
        torch.testing.assert_close(model(x).logits, ref, atol=1e-5, rtol=0)
    assert ad.patch.state_of(model) is None


# -- static caches -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ALL_METHODS)
def test_static_cache_generation_equals_the_dynamic_cache_or_is_refused(method: str) -> None:
    # The static cache's prefill passes mask=None with the keys padded to the cache length: top-left causal, as stock
    # sdpa reads it (a bottom-right alignment let the prompt see the empty slots). DINT's running state needs a
    # dynamic cache, so it refuses.
    model = _patched("llama", method)
    x = inputs(batch=1, length=12)
    kw: dict[str, Any] = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, output_scores=True,
                              return_dict_in_generate=True)
    dynamic = model.generate(x, **kw)
    if not plain(method).static_cache:
        with pytest.raises(ValueError, match="dynamic caches only"):
            model.generate(x, cache_implementation="static", **kw)
        return
    static = model.generate(x, cache_implementation="static", **kw)
    assert torch.equal(static.sequences, dynamic.sequences)
    torch.testing.assert_close(torch.stack(static.scores), torch.stack(dynamic.scores), atol=1e-5, rtol=0)


# -- whole patched models ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family,method", [("llama", "diffk"), ("gpt2", "diff")])
def test_save_pretrained_from_pretrained_round_trip(tmp_path: Path, family: str, method: str) -> None:
    from transformers import AutoModelForCausalLM

    model = _patched(family, method)
    x = inputs()
    ad.save_pretrained(model, tmp_path)
    assert {"config.json", "model.safetensors", "attndenoise_config.json", "attndenoise_model.safetensors"} <= {
        p.name for p in tmp_path.iterdir()}
    back = ad.from_pretrained(tmp_path)
    stock = AutoModelForCausalLM.from_pretrained(tmp_path)  # base only: what stock loading gives
    with torch.no_grad():
        torch.testing.assert_close(back(x).logits, model(x).logits, atol=0, rtol=0)
        ad.remove(model)
        torch.testing.assert_close(stock(x).logits, model(x).logits, atol=0, rtol=0)


def test_plain_save_pretrained_warns_and_names_the_right_call(tmp_path: Path) -> None:
    model = _patched("qwen2", "diffk")
    with pytest.warns(ad.MethodDroppedWarning, match=r"attndenoise\.from_pretrained"):
        model.save_pretrained(tmp_path)
    x = inputs()
    with torch.no_grad():
        torch.testing.assert_close(ad.from_pretrained(tmp_path)(x).logits, model(x).logits, atol=0, rtol=0)
    ad.remove(model)
    assert "save_pretrained" not in model.__dict__  # back to transformers' own method


def test_save_pretrained_refuses_an_unmerged_lora(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="merge_and_unload"):
        ad.save_pretrained(_lora(_patched()), tmp_path)


# -- wrappers ------------------------------------------------------------------------------------------------------


def _wrap(kind: str, model: torch.nn.Module, tmp_path: Path) -> torch.nn.Module:
    if kind == "peft":
        return get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))  # B = 0: same outputs
    if kind == "ddp":
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
        return torch.nn.parallel.DistributedDataParallel(model)
    if kind == "accelerate":
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(True)  # a Trainer earlier in this process may have left bf16 autocast on
        return Accelerator(cpu=True, mixed_precision="no").prepare(model)  # type: ignore[no-any-return]
    return torch.compile(model)  # type: ignore[return-value]  # OptimizedModule; nothing is compiled until called


@pytest.mark.parametrize("kind", ["peft", "ddp", "accelerate", "compile"])
def test_every_api_function_sees_through_wrappers(kind: str, tmp_path: Path) -> None:
    import torch.distributed as dist

    try:
        model = _patched("llama", "dex")
        names = set(ad.current_lambdas(model))
        w = _wrap(kind, model, tmp_path)
        assert ad.method_modules(w) == ad.method_modules(model)
        assert set(ad.current_lambdas(w)) == names
        assert ad.step(w) == 1
        ad.set_step(w, 7)
        assert all(int(m.lam.step) == 7 for m in ad.method_modules(model).values())
        ad.save(w, tmp_path / "a")
        x = inputs()
        with torch.no_grad():
            ref = model(x).logits
            stock = tiny("llama")
            w2 = _wrap(kind, stock, tmp_path)
            if kind == "ddp":  # DDP registered its parameters already: a method added now would not sync
                with pytest.raises(TypeError, match="apply the method first"):
                    ad.load(w2, tmp_path / "a")
                ad.load(stock, tmp_path / "a")
                w2 = _wrap(kind, stock, tmp_path)
            else:
                ad.load(w2, tmp_path / "a")
            torch.testing.assert_close(stock(x).logits, ref, atol=0, rtol=0)
            if kind == "peft":  # folding under a LoRA would leave its delta unfolded: refused
                with pytest.raises(ad.NotMergeableError):
                    ad.merge(w2)
            else:
                ad.merge(w2)  # DEX folds into W_O: same outputs, no method left
                torch.testing.assert_close(stock(x).logits, ref, atol=1e-5, rtol=0)
            ad.remove(w)
            torch.testing.assert_close(model(x).logits, tiny("llama")(x).logits, atol=0, rtol=0)
    finally:
        if kind == "ddp" and dist.is_initialized():
            dist.destroy_process_group()


def test_method_applied_to_a_peft_model_survives_merge_and_unload(tmp_path: Path) -> None:
    pm = _lora(tiny("llama"))
    ad.apply(pm, ad.config_for("diffq", anneal_steps=0))
    randomize(pm)
    x = inputs()
    merged = pm.merge_and_unload()
    ad.save(merged, tmp_path)  # not orphaned: save and remove see it
    with torch.no_grad():
        ref = merged(x).logits
        ad.remove(merged)
        assert (merged(x).logits - ref).abs().max() > 1e-3
        ad.load(merged, tmp_path)
        torch.testing.assert_close(merged(x).logits, ref, atol=0, rtol=0)


# -- adapter file names --------------------------------------------------------------------------------------------


def test_adapter_files_have_their_own_names_beside_a_peft_adapter(tmp_path: Path) -> None:
    from peft import PeftModel

    pm = _lora(_patched())
    pm.save_pretrained(tmp_path)
    ad.save(pm, tmp_path)
    assert {"adapter_config.json", "adapter_model.safetensors", "attndenoise_config.json",
            "attndenoise_model.safetensors"} <= {p.name for p in tmp_path.iterdir()}
    x = inputs()
    with torch.no_grad():
        ref = pm(x).logits
        back = PeftModel.from_pretrained(ad.load(tiny("llama"), tmp_path), tmp_path)  # both from one folder
        torch.testing.assert_close(back(x).logits, ref, atol=0, rtol=0)


def test_adapters_written_under_the_old_names_still_load(tmp_path: Path) -> None:
    model = _patched("llama", "daa")
    # the 0.1.0 layout, written by hand: peft's file names, our format-1 content
    meta = {"format_version": 1, "config": ad.patch.require_state(model).config.to_dict(),
            "base": {"family": "llama", "model_type": "llama", "num_layers": 2, "hidden_size": 32, "num_heads": 4,
                     "num_kv_heads": 2, "head_dim": 8}}
    (tmp_path / "adapter_config.json").write_text(json.dumps(meta))
    tensors = {f"layers.{i}.{k}": v.contiguous() for i, m in ad.method_modules(model).items()
               for k, v in m.state_dict().items()}
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
    x = inputs()
    with torch.no_grad():
        torch.testing.assert_close(ad.load(tiny("llama"), tmp_path)(x).logits, model(x).logits, atol=0, rtol=0)


def test_a_peft_adapter_alone_is_not_taken_for_ours(tmp_path: Path) -> None:
    _lora(tiny("llama")).save_pretrained(tmp_path)
    with pytest.raises(ad.AdapterLoadError, match="PeftModel.from_pretrained"):
        ad.load(tiny("llama"), tmp_path)


# -- lambda in the logs --------------------------------------------------------------------------------------------


def _ids_dataset() -> Any:
    from torch.utils.data import Dataset

    class Ids(Dataset):
        def __len__(self) -> int:
            return 8

        def __getitem__(self, i: int) -> dict:
            x = inputs(batch=1, length=12, seed=i)[0]
            return {"input_ids": x, "labels": x}

    return Ids()


def _scalars(log_dir: Path) -> dict[str, list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, list[float]] = {}
    for f in log_dir.rglob("events.out.tfevents*"):
        ea = EventAccumulator(str(f))
        ea.Reload()
        for tag in ea.Tags()["scalars"]:
            out.setdefault(tag, []).extend(e.value for e in ea.Scalars(tag))
    return out


@pytest.mark.parametrize("how", ["callbacks", "add_to", "our_trainer"])
def test_lambda_reaches_log_history_and_tensorboard(how: str, tmp_path: Path) -> None:
    from transformers import Trainer, TrainingArguments

    from attndenoise.hf_trainer import AtomicTrainer

    has_tb = how != "callbacks"
    if has_tb:
        pytest.importorskip("tensorboard")
    model = tiny("llama")
    ad.apply(model, ad.config_for("daa", anneal_steps=4))
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=2, learning_rate=1e-2,
                             report_to=["tensorboard"] if has_tb else [], use_cpu=True, logging_steps=1,
                             save_strategy="no", disable_tqdm=True)
    cls = AtomicTrainer if how == "our_trainer" else Trainer
    trainer = cls(model=model, args=args, train_dataset=_ids_dataset(),
                  callbacks=[] if how == "add_to" else [ad.LambdaCallback()])
    if how == "add_to":
        ad.LambdaCallback.add_to(trainer)
    trainer.train()
    key = "lambda/model.layers.1.self_attn.attndenoise.lam"
    logged = [h[key] for h in trainer.state.log_history if "loss" in h]
    # the paper schedule by hand, lambda(t) = (1 - a) (t/T) lambda_init + a lambda_learn, a = t/T, T = 4: at t = 1
    # lambda_learn is still 0 (the step-1 forward ran at t = 0, a = 0: no gradient); at t = 2 it is its final value
    lam = ad.method_modules(model)[1].lam
    learn = float(lam.lambda_learn.detach().mean())
    expected = [0.75 * 0.25 * lam.lambda_init, 0.5 * 0.5 * lam.lambda_init + 0.5 * learn]
    torch.testing.assert_close(torch.tensor(logged), torch.tensor(expected), atol=1e-6, rtol=0)
    if has_tb:
        tb = _scalars(tmp_path)
        torch.testing.assert_close(torch.tensor(tb[f"train/{key}"][:2]), torch.tensor(logged), atol=1e-6, rtol=0)


# -- python -m, in-memory data, the Hub ----------------------------------------------------------------------------


def test_python_m_attndenoise_runs_the_cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    # what `python -m attndenoise methods` runs, in this process (a subprocess would re-import everything: ~8 s)
    import runpy

    monkeypatch.setattr(sys, "argv", ["attndenoise", "methods"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module("attndenoise", run_name="__main__")
    assert exit_info.value.code in (0, None)
    out = capsys.readouterr().out
    assert "diffq" in out and "lowrank_dint" in out


def _tokenizer() -> Any:
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers import models as tk_models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, **{f"w{i}": i for i in range(4, VOCAB)}}
    tk = Tokenizer(tk_models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>",
                                   unk_token="<unk>")


@pytest.mark.parametrize("container", ["list", "dataset"])
def test_train_accepts_in_memory_records(container: str, tmp_path: Path) -> None:
    from datasets import Dataset

    records = [{"documents": [f"w{4 + i} w{5 + i} w{6 + i}", f"w{20 + i} w{21 + i}"], "gold": 0,
                "question": f"w{7 + i} w8", "answer": f"w{5 + i}"} for i in range(6)]
    data = records if container == "list" else Dataset.from_list(records)
    with pytest.warns(UserWarning):  # the word-level test tokenizer has no words for the prompt's template
        run = ad.train(model=tiny("llama"), tokenizer=_tokenizer(), data=data, method="daa", steps=1, batch_size=2,
                       out=str(tmp_path / "run"), progress=False, method_options={"anneal_steps": 0})
    recorded = json.loads((tmp_path / "run" / "run.json").read_text())["config"]["data"]
    assert recorded.startswith("<in-memory: 6 records, sha256 ") and recorded == run.run["config"]["data"]


def _hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An offline Hugging Face cache in ``tmp_path``: ``models--org--name/{refs/main, snapshots/<hash>/}``."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "models--org--name"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    for name, value in (("HF_HUB_OFFLINE", True), ("HF_HUB_CACHE", str(cache))):
        monkeypatch.setenv(name, "1" if value is True else str(value))
        monkeypatch.setattr(constants, name, value)
    return snap


def test_load_from_a_hub_id_through_the_local_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    snap = _hub_cache(tmp_path, monkeypatch)
    model = _patched("llama", "diffv")
    ad.save(model, snap)
    x = inputs()
    with torch.no_grad():
        torch.testing.assert_close(ad.load(tiny("llama"), "org/name")(x).logits, model(x).logits, atol=0, rtol=0)
    with pytest.raises(ad.AdapterLoadError, match=r"org/missing.*HF_HUB_OFFLINE"):
        ad.load(tiny("llama"), "org/missing")


def test_push_to_hub_uploads_the_adapter_folder(monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import HfApi

    calls: dict[str, Any] = {}
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: calls.setdefault("repo", repo_id))
    monkeypatch.setattr(HfApi, "upload_folder", lambda self, **kw: calls.setdefault(
        "files", sorted(p.name for p in Path(kw["folder_path"]).iterdir())))
    ad.push_to_hub(_patched(), "org/name")
    assert calls == {"repo": "org/name", "files": ["attndenoise_config.json", "attndenoise_model.safetensors"]}


# -- what peft users reach for: a trainable-parameter summary, running the stock model -----------------------------

# the tiny Llama (tests/models.py), counted by hand: vocab 97, hidden 32, 4 query heads and 2 KV heads of d = 8,
# MLP 64, 2 layers, untied lm_head
_EMBED = 97 * 32
_LAYER = 32 * 32 + 16 * 32 + 16 * 32 + 32 * 32 + 3 * 64 * 32 + 2 * 32  # q, k, v, o, gate/up/down, two norms
_STOCK = _EMBED + 2 * _LAYER + 32 + _EMBED  # + final norm + lm_head
_DAA = 2 * (4 * 8 * 8 + 4)  # per layer h d x d matrices + one lambda_learn per head
_LORA = 2 * ((4 * 32 + 32 * 4) + 2 * (4 * 32 + 16 * 4) + (4 * 32 + 32 * 4))  # r = 4 on q, k, v, o: A + B


@pytest.mark.parametrize("granularity, method_count", [("head", _DAA), ("layer", 2 * (4 * 8 * 8 + 1))])
def test_trainable_parameters_are_split_by_owner(
    granularity: str, method_count: int, capsys: pytest.CaptureFixture[str]
) -> None:
    stock = tiny("llama")
    assert ad.trainable_parameters(stock) == dict(method=0, method_frozen=0, peft=0, base=_STOCK, trainable=_STOCK,
                                                  all=_STOCK, percent=100.0)
    model = ad.apply(tiny("llama"), ad.config_for("daa", lambda_granularity=granularity))
    total = _STOCK + method_count
    assert ad.trainable_parameters(model) == dict(method=method_count, method_frozen=0, peft=0, base=0,
                                                  trainable=method_count, all=total,
                                                  percent=pytest.approx(100 * method_count / total))
    pm = get_peft_model(model, LoraConfig(r=4, target_modules=TARGETS["llama"]))  # freezes the method
    pm.base_model.model.model.norm.weight.requires_grad_(True)  # a base tensor left trainable (32)
    total += _LORA
    frozen = ad.trainable_parameters(pm)
    assert (frozen["method"], frozen["method_frozen"], frozen["peft"], frozen["base"], frozen["all"]) == (
        0, method_count, _LORA, 32, total)
    ad.set_trainable(pm)
    counts = ad.trainable_parameters(pm)
    assert counts == dict(method=method_count, method_frozen=0, peft=_LORA, base=32,
                          trainable=method_count + _LORA + 32, all=total,
                          percent=pytest.approx(100 * (method_count + _LORA + 32) / total))
    # peft's own count of the same model (its total includes every tensor it can see: the same numbers)
    assert pm.get_nb_trainable_parameters() == (counts["trainable"], total)
    ad.print_trainable_parameters(pm)
    out = capsys.readouterr().out
    assert f"method: {method_count:,}" in out and f"peft: {_LORA:,}" in out and f"all params: {total:,}" in out


@pytest.mark.parametrize("method", ["daa", "dint"])  # DINT stores extra per-key quantities in the KV cache
def test_disabled_runs_the_stock_model_and_restores_the_method_exactly(method: str) -> None:
    model = _patched("llama", method)
    stock = tiny("llama")
    x = inputs()
    gen = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        before = model(x).logits
        generated = model.generate(x[:, :5], **gen)
        ref, ref_gen = stock(x).logits, stock.generate(x[:, :5], **gen)
        assert (before - ref).abs().max() > 1e-3  # the method does change the outputs
        tensors = {k: v.clone() for k, v in model.state_dict().items()}
        with ad.disabled(model):
            torch.testing.assert_close(model(x).logits, ref, atol=0, rtol=0)
            assert torch.equal(model.generate(x[:, :5], **gen), ref_gen)
            model.train()  # a training forward inside does not run the method (nor its frozen-parameter check)
            model(input_ids=x, labels=x)
            model.eval()
        torch.testing.assert_close(model(x).logits, before, atol=0, rtol=0)
        assert torch.equal(model.generate(x[:, :5], **gen), generated)
        with pytest.raises(KeyError), ad.disabled(model):
            raise KeyError("inside")
        torch.testing.assert_close(model(x).logits, before, atol=0, rtol=0)
    state = model.state_dict()
    assert state.keys() == tensors.keys() and all(torch.equal(state[k], tensors[k]) for k in state)


def test_disabled_sees_through_a_peft_wrapper() -> None:
    model = _patched("llama", "diffq")
    pm = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))  # B = 0: the stock outputs
    x = inputs()
    with torch.no_grad():
        before = pm(x).logits
        with ad.disabled(pm):
            torch.testing.assert_close(pm(x).logits, tiny("llama")(x).logits, atol=0, rtol=0)
        torch.testing.assert_close(pm(x).logits, before, atol=0, rtol=0)


# -- FSDP2 on CPU: 2 gloo processes ---------------------------------------------------------------------------------


def test_fsdp2_two_processes_save_the_single_process_adapter(tmp_path: Path) -> None:
    import os
    import subprocess

    from safetensors.torch import load_file

    tests = Path(__file__).parent
    torchrun = Path(sys.executable).parent / "torchrun"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(tests), os.environ.get(
        "PYTHONPATH", "")])}
    cmd = [str(torchrun), "--nproc_per_node", "2", "--master_port", str(30500 + os.getpid() % 1000),
           str(tests / "fsdp_worker.py"), str(tmp_path)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["attention_class"] == "FSDPLlamaAttention"  # fully_shard swapped the class; detection still works
    assert report["layers"] == [0, 1]
    assert report["summary"]["method"] == _DAA and report["summary"]["all"] == _STOCK + _DAA  # global, not per shard
    for name in ("remove", "merge", "apply_sharded_stock"):
        assert "FSDP2-sharded" in report[name] and "every rank" in report[name], name
    assert "before fully_shard" in report["apply_sharded_stock"]
    # the single-process reference: the same model, the same step
    one = _patched("llama", "daa")
    one.train()
    opt = torch.optim.AdamW([p for p in one.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    x = inputs()
    one(input_ids=x, labels=x).loss.backward()
    opt.step()
    ad.step(one)
    ref = {f"layers.{i}.{k}": v for i, m in ad.method_modules(one).items() for k, v in m.state_dict().items()}
    got = load_file(str(tmp_path / "adapter" / "attndenoise_model.safetensors"))
    assert got.keys() == ref.keys()
    for k in ref:
        torch.testing.assert_close(got[k], ref[k].detach(), atol=1e-6, rtol=1e-5)
    assert int(got["layers.0.lam.step"]) == 1
    one.eval()
    loaded = ad.load(tiny("llama"), tmp_path / "adapter")  # an ordinary adapter: loads into a stock model
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, one(x).logits, atol=1e-5, rtol=0)
