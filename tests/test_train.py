"""Training: every kind (method, method+lora, lora, none) trains what it should, lowers the loss, and round-trips
through load_trained; a SIGKILLed run resumes to the uninterrupted result; torchrun with 2 processes equals 1 process;
the CLI.

References are independent of the training code: the stock model (initial loss, frozen weights), peft's documented
LoRA initialisation (B = 0), a freshly applied method (its initial tensors), and an uninterrupted / single-process run.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from models import tiny
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.trainer_utils import get_last_checkpoint
from typer.testing import CliRunner

import attndenoise as ad
from attndenoise.cli import app
from attndenoise.data import SyntheticQA, build_noisy_example, collate, encode_for_training, load_examples
from attndenoise.io import WEIGHTS_NAME
from attndenoise.tiny import tiny_model_path
from attndenoise.train import PROJECTIONS_FILE, TrainConfig, TrainResult

SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=64, batch_size=8, steps=20, warmup_steps=5, max_position_embeddings=512,
             induction_steps=5)
PROJ = re.compile(r"model\.layers\.\d+\.self_attn\.[qkvo]_proj\.weight")
RUNS: dict[str, dict[str, Any]] = {
    "method": dict(method="daa", method_options={"anneal_steps": 0}),
    "method+lora": dict(method="daa", lora=True, lora_rank=4, method_options={"anneal_steps": 2}),
    # The DAA paper's protocol; patching layer 1 only shows that only the patched layers' projections train.
    "method+attn": dict(method="daa", attention=True, method_options={"anneal_steps": 0, "layers": [1]}),
    "lora": dict(method="lora", lora_rank=4),
    "none": dict(method="none"),
}
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_model_path(tmp_path_factory.mktemp("cache"), threads=1, **SMALL)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    exs = [build_noisy_example(e, 0.5, rng=i) for i, e in enumerate(SyntheticQA(3, split="test").examples(8))]
    path.write_text("".join(json.dumps({"documents": list(e.documents), "gold": list(e.gold), "question": e.question,
                                        "answer": e.answer}) + "\n" for e in exs))
    return path


def common(base: Path, data_file: Path, out: Path, **kw: Any) -> dict[str, Any]:
    return {**dict(model=str(base), data=str(data_file), out=str(out), steps=8, batch_size=4, learning_rate=1e-2,
                   max_length=256, save_steps=100, logging_steps=1, progress=False, seed=0), **kw}


@pytest.fixture(scope="module")
def runs(base: Path, data_file: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, TrainResult]:
    root = tmp_path_factory.mktemp("runs")
    return {kind: ad.train(**{**common(base, data_file, root / kind.replace("+", "_"), **kw), "steps": 12,
                              "learning_rate": 2e-2}) for kind, kw in RUNS.items()}


def stock(base: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(base).eval()


def fixed_batch(base: Path, data_file: Path) -> dict[str, torch.Tensor]:
    """All 8 training examples, encoded here (not by the training code)."""
    tok = AutoTokenizer.from_pretrained(base)
    return collate([encode_for_training(e, tok) for e in load_examples(data_file)], tok.pad_token_id)


def logits_and_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, float]:
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=-100)
    return logits, float(loss)


# -- what each kind trains --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(RUNS))
def test_training_lowers_the_loss_and_load_trained_reproduces_the_model(
    kind: str, runs: dict[str, TrainResult], base: Path, data_file: Path
) -> None:
    batch = fixed_batch(base, data_file)
    _, initial = logits_and_loss(stock(base), batch)  # every kind starts as the stock model (identity init)
    result = runs[kind]
    trained_logits, trained = logits_and_loss(result.model, batch)
    # The tiny model and a dozen steps move the loss by 1e-3 (DAA) to 1e-1 (LoRA); the run is deterministic, so a
    # drop beyond float noise is the signal.
    print(f"{kind}: loss {initial:.5f} -> {trained:.5f}")
    assert trained < initial - 5e-4, (kind, initial, trained)
    loaded = ad.load_trained(stock(base), result.out_dir)
    loaded_logits, _ = logits_and_loss(loaded, batch)
    torch.testing.assert_close(loaded_logits, trained_logits, atol=1e-5, rtol=1e-5)
    run = json.loads((result.out_dir / "run.json").read_text())
    assert run["kind"] == kind and run["steps"] == 12 and run["base_model"] == str(base)
    assert [h["step"] for h in run["loss_history"]] == list(range(1, 13))
    assert run["seconds"] > 0 and run["global_batch"] == 4 and run["config"]["learning_rate"] == 2e-2
    if "method" in kind:
        assert run["method_config"]["method"] == "daa" and run["final_lambdas"]
        assert any(k.startswith("lambda/") for k in run["lambda_history"][-1])


def test_none_trains_only_the_attention_projections(runs: dict[str, TrainResult], base: Path) -> None:
    ref = dict(stock(base).named_parameters())
    changed = {n for n, p in runs["none"].model.named_parameters() if not torch.equal(p, ref[n])}
    assert changed == {n for n in ref if PROJ.fullmatch(n)}
    saved = load_file(str(runs["none"].out_dir / PROJECTIONS_FILE))
    assert set(saved) == changed


def test_method_with_attention_trains_the_method_and_its_layers_projections(runs: dict[str, TrainResult],
                                                                           base: Path) -> None:
    ref = dict(stock(base).named_parameters())
    params = dict(runs["method+attn"].model.named_parameters())
    changed = {n for n, p in params.items() if n not in ref or not torch.equal(p, ref[n])}
    method = {n for n in params if "attndenoise" in n}
    assert method and all(".layers.1." in n for n in method)
    layer1 = {n for n in ref if PROJ.fullmatch(n) and ".layers.1." in n}
    assert len(layer1) == 4 and changed == method | layer1  # layer 0 (unpatched), norms, MLP, embeddings frozen
    saved = load_file(str(runs["method+attn"].out_dir / PROJECTIONS_FILE))
    assert set(saved) == layer1


def test_attention_protocol_options_are_checked(base: Path, data_file: Path, tmp_path: Path) -> None:
    with pytest.raises(ad.ConfigError, match="two protocols"):
        TrainConfig(model=str(base), method="daa", attention=True, lora=True)
    with pytest.raises(ad.ConfigError, match="baseline"):
        TrainConfig(model=str(base), method="none", attention=True)
    with pytest.raises(ad.ConfigError, match="needs --attention"):
        ad.train(**common(base, data_file, tmp_path / "x", method="daa", lm_head=True, steps=1))


def test_lora_under_a_method_trains_both(runs: dict[str, TrainResult], base: Path) -> None:
    peft_model = runs["method+lora"].model
    params = dict(peft_model.named_parameters())
    lora_b = [p for n, p in params.items() if "lora_B" in n]
    assert len(lora_b) == 8 and all(p.abs().sum() > 0 for p in lora_b)  # peft initialises B to zero
    fresh = ad.apply(stock(base), ad.config_for("daa", anneal_steps=2))
    init = {n: p for n, p in fresh.named_parameters() if "attndenoise" in n}
    trained = {n.removeprefix("base_model.model."): p for n, p in params.items() if "attndenoise" in n}
    assert trained.keys() == init.keys() and all(not torch.equal(trained[n], init[n]) for n in init)
    ref = dict(stock(base).named_parameters())
    base_params = {n.removeprefix("base_model.model.").replace(".base_layer", ""): p for n, p in params.items()
                   if "lora_" not in n and "attndenoise" not in n}
    assert base_params.keys() == ref.keys() and all(torch.equal(base_params[n], ref[n]) for n in ref)


def test_lora_baseline_leaves_base_weights(runs: dict[str, TrainResult], base: Path) -> None:
    params = dict(runs["lora"].model.named_parameters())
    trainable = {n for n, p in params.items() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert {m for n in trainable for m in re.findall(r"\.([qkvo]_proj)\.", n)} == {"q_proj", "k_proj", "v_proj",
                                                                                  "o_proj"}


# -- load_trained is strict -------------------------------------------------------------------------------------------


def test_load_trained_errors(runs: dict[str, TrainResult], tmp_path: Path) -> None:
    with pytest.raises(ad.AdapterLoadError, match="no run.json"):
        ad.load_trained(tiny("llama"), tmp_path)
    with pytest.raises(ad.AdapterLoadError, match="another base architecture.*family"):
        ad.load_trained(tiny("qwen2"), runs["method"].out_dir)
    # same geometry, tampered tensors: a missing projection is named
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "run.json").write_text((runs["none"].out_dir / "run.json").read_text())
    tensors = load_file(str(runs["none"].out_dir / PROJECTIONS_FILE))
    tensors.pop("model.layers.1.self_attn.o_proj.weight")
    from safetensors.torch import save_file

    save_file(tensors, str(bad / PROJECTIONS_FILE))
    model = tiny("llama")
    before = {n: p.clone() for n, p in model.named_parameters()}
    with pytest.raises(ad.AdapterLoadError, match=r"missing tensor\(s\) model.layers.1.self_attn.o_proj.weight"):
        ad.load_trained(model, bad)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


# -- nothing lost: SIGKILL mid-training, then resume ------------------------------------------------------------------

KILL_SCRIPT = textwrap.dedent("""
    import json, sys, time
    import torch
    torch.set_num_threads(1)
    from transformers import TrainerCallback
    import attndenoise as ad

    class Slow(TrainerCallback):  # leaves time to kill the run after its first checkpoint
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step >= 4:
                time.sleep(1.0)

    ad.train(callbacks=[Slow()], **json.loads(sys.argv[1]))
""")


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


@pytest.mark.parametrize("kind", ["method+lora", "method+attn"])
def test_resume_after_sigkill_equals_uninterrupted(kind: str, base: Path, data_file: Path, tmp_path: Path) -> None:
    kw = common(base, data_file, tmp_path / "killed", **RUNS[kind])
    kw.update(save_steps=2, steps=8)
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, json.dumps(kw)], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    out = tmp_path / "killed"
    deadline = time.monotonic() + 120
    while not (out / "checkpoint-4").is_dir():
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:] if proc.stderr else ""
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "run.json").exists() and not (out / "attndenoise_model.safetensors").exists()
    last = get_last_checkpoint(str(out))
    assert last is not None and int(last.rsplit("-", 1)[1]) < 8
    ckpt_files = {p.name: p.stat().st_size for p in Path(last).rglob("*") if p.is_file()}  # before rotation

    resumed = ad.train(**{**kw, "resume": True})
    assert resumed.run["resumed_from"] == last
    straight = ad.train(**{**kw, "out": str(tmp_path / "straight")})
    second = "lora/adapter_model.safetensors" if kind == "method+lora" else PROJECTIONS_FILE
    for rel in ("attndenoise_model.safetensors", second):
        a, b = _tensors(out / rel), _tensors(tmp_path / "straight" / rel)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (rel, k)
    assert resumed.run["loss_history"] == straight.run["loss_history"]
    # The checkpoint holds the trained tensors, optimiser, scheduler and RNG state, not the base model (a 7B base
    # would cost 14 GB per checkpoint): no weights file of the base; its tensors and the optimiser state are the
    # trained tensors (the finished run's adapter files) about three times over (values + two Adam moments, plus
    # pickling per tensor), and the rest (RNG, Trainer and scheduler state, settings) is a fixed few tens of KB.
    assert not set(ckpt_files) & {"model.safetensors", "pytorch_model.bin"}, ckpt_files
    trained = sum((tmp_path / "straight" / rel).stat().st_size for rel in (WEIGHTS_NAME, second))
    scaling = sum(v for k, v in ckpt_files.items() if k.endswith(".safetensors") or k == "optimizer.pt")
    assert scaling < 4.5 * trained, (ckpt_files, trained)
    assert sum(ckpt_files.values()) - scaling < 40_000, ckpt_files


def test_existing_run_needs_resume(runs: dict[str, TrainResult], base: Path, data_file: Path) -> None:
    with pytest.raises(ad.TrainError, match="already holds a run; pass --resume"):
        ad.train(**common(base, data_file, runs["method"].out_dir, **RUNS["method"]))


# -- distributed: torchrun, 2 processes, gloo on CPU ------------------------------------------------------------------


def test_torchrun_two_processes_equal_one(base: Path, data_file: Path, tmp_path: Path) -> None:
    torchrun = Path(sys.executable).parent / "torchrun"
    cli = Path(sys.executable).parent / "attndenoise"
    ddp_out = tmp_path / "ddp"
    cmd = [str(torchrun), "--nproc_per_node", "2", "--master_port", str(29500 + os.getpid() % 1000), str(cli),
           "train", "--model", str(base), "--method", "daa", "--lora", "--lora-rank", "4", "--data", str(data_file),
           "--out", str(ddp_out), "--steps", "4", "--batch-size", "2", "--lr", "1e-2", "--max-length", "256",
           "--save-steps", "2", "--logging-steps", "1", "--no-progress", "--set", "anneal_steps=2"]
    done = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.count("trained method+lora (daa) for 4 steps") == 1  # only the main process reports
    one = ad.train(**common(base, data_file, tmp_path / "one", **{**RUNS["method+lora"], "steps": 4, "save_steps": 2}))
    run = json.loads((ddp_out / "run.json").read_text())
    assert run["world_size"] == 2 and run["global_batch"] == 4 and one.run["global_batch"] == 4
    for rel in ("attndenoise_model.safetensors", "lora/adapter_model.safetensors"):
        a, b = _tensors(ddp_out / rel), _tensors(one.out_dir / rel)
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)
    assert [h["loss"] for h in run["loss_history"]] == pytest.approx([h["loss"] for h in one.run["loss_history"]],
                                                                     abs=1e-4)


# -- the command line and its errors ----------------------------------------------------------------------------------


def test_cli_help_explains_every_option() -> None:
    result = CliRunner().invoke(app, ["train", "--help"], env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    for opt in ("--model", "--method", "--data", "--out", "--noise", "--steps", "--lr", "--batch-size",
                "--grad-accum", "--max-length", "--seed", "--save-steps", "--resume", "--lora", "--lora-rank",
                "--qlora", "--set"):
        line = next((ln for ln in result.output.splitlines() if re.match(rf"│\s+(\*\s+)?{opt}(?![-\w])", ln)), None)
        assert line is not None and len(line.split(opt, 1)[1].strip(" │")) > 10, (opt, line)


def test_cli_run_with_noise_and_set(base: Path, data_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "cli"
    result = CliRunner().invoke(app, [
        "train", "--model", str(base), "--method", "diffq", "--data", str(data_file), "--out", str(out),
        "--noise", "0.8", "--steps", "2", "--batch-size", "2", "--max-length", "512", "--no-progress",
        "--set", "anneal_steps=5", "--set", "layers=[1]"])
    assert result.exit_code == 0, result.output
    run = json.loads((out / "run.json").read_text())
    assert run["method_config"]["anneal_steps"] == 5 and run["method_config"]["layers"] == [1]
    assert run["config"]["noise"] == 0.8
    cfg = json.loads((out / "attndenoise_config.json").read_text())
    assert cfg["config"]["method"] == "diffq"
    assert set(ad.method_modules(ad.load_trained(stock(base), out))) == {1}


@pytest.mark.parametrize("args,message", [
    (["--method", "nope"], r"unknown method 'nope'; known methods: none, lora, daa"),
    (["--method", "daa", "--data", "missing.jsonl"], "no such data file: missing.jsonl"),
    (["--method", "daa", "--set", "wher=pre_rope"], "unknown field.*wher.*accepted"),
    (["--method", "daa", "--qlora"], "--qlora needs a CUDA device"),
    (["--method", "lora", "--lora"], "use --method lora for plain LoRA"),
    (["--method", "sra"], "no trainable parameters"),
])
def test_cli_errors_are_clear(args: list[str], message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    # The model path does not exist: each error must come before anything is loaded.
    result = CliRunner().invoke(app, ["train", "--model", str(tmp_path / "no-model"), "--out", str(tmp_path / "o"),
                                      *args], env={"COLUMNS": "300"})
    assert result.exit_code == 2
    assert re.search(message, " ".join(result.output.split())), result.output
    assert not (tmp_path / "o").exists()


def test_short_run_warns_that_lambda_will_not_finish_its_ramp(base: Path) -> None:
    from attndenoise.train import prepare_model

    with pytest.warns(UserWarning, match="anneal_steps=1000 > steps=10"):
        prepare_model(stock(base), TrainConfig(model=str(base), method="daa", steps=10,
                                               method_options={"anneal_steps": 1000}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # OpAmp has no lambda schedule: nothing to warn about
        prepare_model(stock(base), TrainConfig(model=str(base), method="opamp", steps=10))
        prepare_model(stock(base), TrainConfig(model=str(base), method="daa", steps=10,
                                               method_options={"anneal_steps": 10}))
        # not set: the ramp follows the run length, so nothing to warn about either
        prepare_model(stock(base), TrainConfig(model=str(base), method="daa", steps=10))


def test_default_ramp_follows_the_run_length(base: Path, data_file: Path, tmp_path: Path) -> None:
    def anneal(**kw: Any) -> int:
        cfg = TrainConfig(steps=30, **kw).method_config()
        assert cfg is not None
        return cfg.anneal_steps

    assert anneal(method="daa") == 30 and anneal(method="daa", method_options={"anneal_steps": 7}) == 7
    assert anneal(method="opamp") == 1000  # no lambda schedule: left alone
    res = ad.train(**common(base, data_file, tmp_path / "ramp", method="daa", steps=4, learning_rate=1e-3))
    assert res.run["method_config"]["anneal_steps"] == 4
    # DAA eq. 3 by hand at t = 2 of T = 4: (1 - 1/2) (1/2) 0.8 + (1/2) lambda_learn, lambda_learn within
    # 2 steps x lr 1e-3 of 0 (Adam moves a parameter by at most ~lr per step): 0.2 +- 0.001. With the library's
    # T = 1000 it would be 0.0016.
    at2 = next(h for h in res.run["lambda_history"] if h["step"] == 2)
    values = [v for k, vals in at2.items() if k.startswith("lambda/")
              for v in (vals if isinstance(vals, list) else [vals])]
    assert values and all(abs(v - 0.2) < 1.5e-3 for v in values), values


def test_noise_mix_draws_a_ratio_per_example() -> None:
    from attndenoise.config import ConfigError
    from attndenoise.data import noisy_examples
    from attndenoise.train import TrainConfig, load_training_examples

    cfg = TrainConfig(model="m", method="none", out="o", noise_mix=[0.0, 0.8], synthetic_examples=60)
    counts = {len(e.documents) for e in load_training_examples(cfg)}  # type: ignore[union-attr]
    assert counts == {1, 5}  # no distractor or four of them
    assert load_training_examples(cfg) == load_training_examples(cfg)  # seeded
    raw = SyntheticQA(seed=0).examples(4)
    assert noisy_examples(raw, [0.8], seed=1) == noisy_examples(raw, 0.8, seed=1)  # a one-ratio mix is that ratio
    with pytest.raises(ConfigError, match="noise_mix"):
        TrainConfig(model="m", method="none", out="o", noise_mix=[0.8, 1.0])


def test_dex_entropy_head_selection_calibrates_on_training_examples(base: Path, data_file: Path,
                                                                     tmp_path: Path) -> None:
    from attndenoise.data import collate, encode_examples
    from attndenoise.train import load_training_examples

    kw = common(base, data_file, tmp_path / "dex", steps=2, method="dex",
                method_options={"head_selection": "entropy", "head_fraction": 0.5, "anneal_steps": 2})
    res = ad.train(**kw)
    heads = res.run["method_config"]["heads"]
    # Independent reference: entropies of transformers' own eager maps on the first 8 training examples.
    tok = AutoTokenizer.from_pretrained(base)
    feats = [e.features() for e in encode_examples(load_training_examples(TrainConfig(**kw)), tok, 256).encoded[:8]]
    batch = collate(feats, tok.pad_token_id)
    model = AutoModelForCausalLM.from_pretrained(base, attn_implementation="eager").eval()
    with torch.no_grad():
        maps = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     output_attentions=True).attentions
    valid = batch["attention_mask"].bool()
    for layer, a in enumerate(maps):
        ent = -(a * a.clamp_min(1e-12).log()).sum(-1)  # (B, H, N)
        per_head = ent.permute(1, 0, 2)[:, valid].mean(-1)
        keep = per_head.topk(max(1, -(-per_head.numel() // 2))).indices.sort().values.tolist()
        assert heads[str(layer)] == keep
    again = ad.load_trained(stock(base), res.out_dir)  # the resolved heads travel with the adapter
    assert ad.method_modules(again)[0].config.heads == heads
