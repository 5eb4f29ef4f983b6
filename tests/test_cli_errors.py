"""Every user error of the command line ends in one line that names the problem (and what is accepted), exit code 2,
no traceback and nothing written; a run killed during training leaves only complete checkpoints, which `eval`
refuses and `train --resume` continues only with the recorded settings.

The models are tiny random ones built here from configs (Llama with the embedded word-level tokenizer, OPT for an
unsupported family); nothing is downloaded. The references are hand-written: the messages a user must see, the
settings a test changed, the files that must not exist.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM
from transformers.trainer_utils import get_last_checkpoint
from typer.testing import CliRunner

import attndenoise as ad
from attndenoise.cli import app
from attndenoise.data import SyntheticQA, build_noisy_example, build_tokenizer
from attndenoise.io import CONFIG_NAME, WEIGHTS_NAME

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def llama(layers: int = 2, seed: int = 0) -> LlamaForCausalLM:
    tok = build_tokenizer()
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, pad_token_id=0,
                      bos_token_id=2, eos_token_id=3)
    return LlamaForCausalLM(cfg).eval()


def save_model(model: torch.nn.Module, path: Path) -> Path:
    model.save_pretrained(path)
    build_tokenizer().save_pretrained(path)
    return path


def record(ex: Any) -> dict[str, Any]:
    return {"documents": list(ex.documents), "gold": list(ex.gold), "question": ex.question, "answer": ex.answer}


@pytest.fixture(scope="module")
def f(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every file and folder the bad inputs point at, built once."""
    root = tmp_path_factory.mktemp("cli-errors")
    p: dict[str, Path] = {"root": root}
    p["llama"] = save_model(llama(), root / "llama")
    opt = OPTForCausalLM(OPTConfig(vocab_size=len(build_tokenizer()), hidden_size=32, num_hidden_layers=2,
                                   ffn_dim=64, num_attention_heads=4, max_position_embeddings=1024,
                                   word_embed_proj_dim=32,
                                   pad_token_id=0, bos_token_id=2, eos_token_id=3))
    p["opt"] = save_model(opt, root / "opt")
    nan = llama()
    with torch.no_grad():
        nan.model.norm.weight[0] = float("nan")
    p["nanmodel"] = save_model(nan, root / "nanmodel")
    p["noconfig"] = root / "noconfig"
    p["noconfig"].mkdir()
    (p["noconfig"] / "model.safetensors").write_bytes(b"")
    p["truncmodel"] = save_model(llama(), root / "truncmodel")
    weights = p["truncmodel"] / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:300])

    # adapters: a good one, one for a 3-layer model, one with a NaN, one truncated, broken configs
    p["adapter"] = root / "adapter"
    ad.save(ad.apply(llama(), ad.config_for("daa")), p["adapter"])
    p["adapter3"] = root / "adapter3"
    ad.save(ad.apply(llama(layers=3), ad.config_for("daa")), p["adapter3"])
    p["nanadapter"] = root / "nanadapter"
    shutil.copytree(p["adapter"], p["nanadapter"])
    tensors = load_file(str(p["nanadapter"] / WEIGHTS_NAME))
    tensors["layers.1.weight"][0, 0, 0] = float("nan")
    save_file(tensors, str(p["nanadapter"] / WEIGHTS_NAME))
    p["truncadapter"] = root / "truncadapter"
    shutil.copytree(p["adapter"], p["truncadapter"])
    w = p["truncadapter"] / WEIGHTS_NAME
    w.write_bytes(w.read_bytes()[: len(w.read_bytes()) // 2])
    p["badjsonadapter"] = root / "badjsonadapter"
    shutil.copytree(p["adapter"], p["badjsonadapter"])
    (p["badjsonadapter"] / CONFIG_NAME).write_text('{"config": ')
    p["unknownmethodadapter"] = root / "unknownmethodadapter"
    shutil.copytree(p["adapter"], p["unknownmethodadapter"])
    meta = json.loads((p["adapter"] / CONFIG_NAME).read_text())
    meta["config"]["method"] = "daaa"
    (p["unknownmethodadapter"] / CONFIG_NAME).write_text(json.dumps(meta))
    p["emptydir"] = root / "emptydir"
    p["emptydir"].mkdir()
    p["file"] = root / "a-file.txt"
    p["file"].write_text("not a folder\n")

    # data
    exs = [build_noisy_example(e, 0.5, rng=i) for i, e in enumerate(SyntheticQA(3, split="test").examples(4))]
    p["data"] = root / "qa.jsonl"
    p["data"].write_text("".join(json.dumps(record(e)) + "\n" for e in exs))
    p["badline"] = root / "badline.jsonl"
    p["badline"].write_text(json.dumps(record(exs[0])) + "\n" + '{"documents": ["x"], "gold": 0,\n')
    p["nofield"] = root / "nofield.jsonl"
    p["nofield"].write_text(json.dumps({k: v for k, v in record(exs[0]).items() if k != "question"}) + "\n")
    p["badgold"] = root / "badgold.jsonl"
    p["badgold"].write_text(json.dumps({**record(exs[0]), "gold": 7}) + "\n")
    p["chat"] = root / "chat.jsonl"
    p["chat"].write_text(json.dumps({"messages": [{"role": "user", "content": "Question: who?"},
                                                  {"role": "assistant", "content": "Kalo"}]}) + "\n")
    p["txt"] = root / "qa.txt"
    p["txt"].write_text("hello\n")
    p["badtexts"] = root / "texts.jsonl"
    p["badtexts"].write_text('{"text": "a b"}\n{"txt": "c"}\n')
    p["example"] = root / "example.json"
    p["example"].write_text(json.dumps(record(exs[0])))
    p["badexample"] = root / "badexample.json"
    p["badexample"].write_text('{"documents": ["a"],\n "gold": [0] "question": "q"}')
    p["noanswer"] = root / "noanswer.json"
    p["noanswer"].write_text(json.dumps({k: v for k, v in record(exs[0]).items() if k != "answer"}))
    p["chatexample"] = root / "chatexample.json"
    p["chatexample"].write_text(json.dumps({"messages": [{"role": "user", "content": "Question: who?"},
                                                         {"role": "assistant", "content": "Kalo"}]}))
    # --config files
    p["cfg_unknown"] = root / "unknown.json"
    p["cfg_unknown"].write_text(json.dumps({"method": "daa", "stepz": 10}))
    p["cfg_list"] = root / "list.json"
    p["cfg_list"].write_text("[1, 2]")
    p["cfg_bad"] = root / "bad.json"
    p["cfg_bad"].write_text('{"method": "daa",\n "steps": }')
    p["cfg_type"] = root / "type.json"
    p["cfg_type"].write_text(json.dumps({"method": "daa", "learning_rate": "fast"}))
    return p


def invoke(args: list[str]) -> Any:
    return CliRunner().invoke(app, args, env={"COLUMNS": "200"})


def assert_user_error(result: Any, pattern: str) -> str:
    """Exit code 2, one ``error:`` line matching ``pattern``, and no traceback."""
    output = result.output
    assert result.exit_code == 2, (result.exit_code, output, result.exception)
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in output
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, output
    assert re.search(pattern, errors[0]), (pattern, errors[0])
    return errors[0]


def fmt(items: list[str], p: dict[str, Path]) -> list[str]:
    return [a.format(**{k: str(v) for k, v in p.items()}) for a in items]


# -- eval: every bad argument, file, adapter and model ----------------------------------------------------------------

EVAL_CASES: dict[str, tuple[list[str], str]] = {
    "unknown task": (["--task", "nope"], r"unknown task nope; accepted: noisy-qa, needle, ppl"),
    "noise 1.0": (["--noise", "1.0"], r"--noise 1 is out of range: give numbers in \[0, 1\)"),
    "noise negative": (["--noise", "0,-0.1"], r"--noise -0.1 is out of range: give numbers in \[0, 1\)"),
    "noise text": (["--noise", "low"], r"--noise 'low': give comma-separated numbers in \[0, 1\)"),
    "batch size 0": (["--batch-size", "0"], r"--batch-size 0: give an integer >= 1"),
    "n 0": (["--n", "0"], r"--n 0: give an integer >= 1"),
    "max new tokens 0": (["--max-new-tokens", "0"], r"--max-new-tokens 0: give an integer >= 1"),
    "needle n 0": (["--task", "needle", "--needle-n", "0"], r"--needle-n 0: give an integer >= 1"),
    "context length 0": (["--task", "needle", "--context-lengths", "64,0"],
                         r"--context-lengths 0 is out of range: give integers in \[1, inf\]"),
    "context length not int": (["--task", "needle", "--context-lengths", "64.5"],
                               r"--context-lengths '64.5': give comma-separated integers"),
    "depth 1.5": (["--task", "needle", "--depths", "0,1.5"], r"--depths 1.5 is out of range: give numbers in \[0, 1\]"),
    "dtype": (["--dtype", "float8"], r"--dtype 'float8': accepted: float32, bfloat16, float16"),
    "threads 0": (["--threads", "0"], r"--threads 0: give an integer >= 1"),
    "out is a file": (["--out", "{file}"], r"--out .*a-file.txt is a file; give a folder"),
    "data missing": (["--data", "{root}/missing.jsonl"], r"--data .*missing.jsonl: no such file \(give a \.jsonl"),
    "data bad line": (["--data", "{badline}"], r"badline.jsonl:2: invalid JSON"),
    "data missing field": (["--data", "{nofield}"], r"nofield.jsonl:1: missing field 'question'"),
    "data gold out of range": (["--data", "{badgold}"], r"badgold.jsonl:1: gold index 7 out of range for 2 documents"),
    "data unsupported type": (["--data", "{txt}"], r"qa.txt: unsupported file type '.txt'; accepted: .jsonl"),
    "chat data with noise": (["--data", "{chat}"], r"1 chat example\(s\) have no documents.*--noise as-is"),
    "texts missing": (["--task", "ppl", "--texts", "{root}/missing.txt"], r"no such text file: .*missing.txt"),
    "texts bad record": (["--task", "ppl", "--texts", "{badtexts}"],
                         r"texts.jsonl:2: expected an object with a string field 'text'"),
    "adapter missing": (["--adapter", "{root}/no/such/adapter"], r"--adapter .*adapter: no such directory"),
    "adapter is a file": (["--adapter", "{file}"], r"--adapter .*a-file.txt is a file; give the folder of a training"),
    "adapter not an adapter": (["--adapter", "{emptydir}"],
                               r"--adapter .*emptydir is not an adapter: it holds neither run.json .* nor "),
    "adapter bad json": (["--adapter", "{badjsonadapter}"], rf"{CONFIG_NAME}: not valid JSON"),
    "adapter unknown method": (["--adapter", "{unknownmethodadapter}"],
                               r"unknown method 'daaa'; known methods: daa, dex"),
    "adapter other architecture": (["--model", "{llama}", "--adapter", "{adapter3}"],
                                   r"adapter was made for another base architecture "
                                   r"\(num_layers: adapter 3 vs model 2\)"),
    "adapter with NaN": (["--model", "{llama}", "--adapter", "{nanadapter}"],
                         rf"{WEIGHTS_NAME}: non-finite values \(NaN or inf\) in tensor\(s\) layers.1.weight"),
    "adapter truncated": (["--model", "{llama}", "--adapter", "{truncadapter}"],
                          rf"truncadapter/{WEIGHTS_NAME}: not a readable safetensors file"),
    "unsupported family": (["--model", "{opt}", "--adapter", "{adapter}"],
                           r"OPTForCausalLM is not supported .*supported families: llama, qwen2"),
    "model path missing": (["--model", "{root}/no/such/model"], r"no such model file or folder: .*; accepted: tiny"),
    "model folder without config": (["--model", "{noconfig}"], r"noconfig is a folder without a config.json"),
    "model weights truncated": (["--model", "{truncmodel}"], r"--model .*truncmodel: cannot load a causal LM from"),
    "method trainable": (["--method", "daa"], r"--method daa is trainable.*inference-only methods \(sra\)"),
    "method unknown": (["--method", "sraa"], r"unknown method 'sraa'; known methods: daa"),
    "method field unknown": (["--method", "sra", "--set", "bb=5"],
                             r"unknown field\(s\) bb for method 'sra'; accepted:"),
    "method bad value": (["--method", "sra", "--set", "b=-1"], r"b=-1: must be an integer >= 0"),
    "set without method": (["--set", "b=5"], r"--set b: give --method too"),
    "set without =": (["--method", "sra", "--set", "b5"], r"--set 'b5': expected key=value"),
    "method on an adapter's method": (["--model", "{llama}", "--adapter", "{adapter}", "--method", "sra"],
                                      r"--method sra: the adapter already carries method 'daa'"),
    "sra short prompt error": (["--model", "{llama}", "--method", "sra", "--set", "short_prompt=error", "--n", "1",
                                "--noise", "0"],
                               r"SRA: example 0 has \d+ valid prompt tokens; the inter rule needs more"),
}


@pytest.mark.parametrize("case", list(EVAL_CASES))
def test_eval_user_errors(case: str, f: dict[str, Path], tmp_path: Path) -> None:
    args, pattern = EVAL_CASES[case]
    out = tmp_path / "eval-out"
    args = fmt(args, f)
    if "--out" not in args:
        args += ["--out", str(out)]
    if "--model" not in args:
        args += ["--model", str(f["llama"])]
    assert_user_error(invoke(["eval", *args]), pattern)
    assert not out.exists()  # nothing written, not even the folder


# -- inspect ----------------------------------------------------------------------------------------------------------

INSPECT_CASES: dict[str, tuple[list[str], str]] = {
    "example missing": (["--example", "{root}/missing.json"], r"--example .*missing.json: no such file"),
    "example invalid JSON": (["--example", "{badexample}"],
                             r"badexample.json:2: invalid JSON \(Expecting ',' delimiter"),
    "example missing answer": (["--example", "{noanswer}"], r"noanswer.json: missing field 'answer'"),
    "chat example without gold": (["--example", "{chatexample}"], r"a chat example needs its 'gold' passage"),
    "noise 1.0": (["--noise", "1.0"], r"--noise 1: give a ratio in \[0, 1\)"),
    "query": (["--query", "middle"], r"--query 'middle': accepted: last, answer"),
    "layer out of range": (["--layer", "5"], r"--layer 5 is out of range: the model has 2 layers \(give 0\.\.1"),
    "out is a folder": (["--out", "{emptydir}"], r"--out .*emptydir is a folder; give an image file name"),
    "out not an image": (["--out", "{root}/attention.txt"], r"attention.txt: give an image file name ending in .png"),
    "unsupported family": (["--model", "{opt}"], r"OPTForCausalLM is not supported .*supported families: llama"),
    "adapter with NaN": (["--adapter", "{nanadapter}"], r"non-finite values \(NaN or inf\) in tensor\(s\) layers.1"),
    "killed-style folder": (["--adapter", "{emptydir}"], r"is not an adapter"),
}


@pytest.mark.parametrize("case", list(INSPECT_CASES))
def test_inspect_user_errors(case: str, f: dict[str, Path], tmp_path: Path) -> None:
    args, pattern = INSPECT_CASES[case]
    out = tmp_path / "attention.png"
    args = fmt(args, f)
    if "--out" not in args:
        args += ["--out", str(out)]
    if "--model" not in args:
        args += ["--model", str(f["llama"])]
    assert_user_error(invoke(["inspect", *args]), pattern)
    assert not out.exists()


# -- train ------------------------------------------------------------------------------------------------------------

TRAIN_CASES: dict[str, tuple[list[str], str]] = {
    "no method": (["--out", "{out}"], r"--method is missing: give --method \(or \"method\" in a --config file\)"),
    "no out": (["--method", "daa"], r"--out is missing"),
    "unknown method": (["--method", "dax", "--out", "{out}"], r"unknown method 'dax'; known methods: none, lora, daa"),
    "unknown field": (["--method", "daa", "--out", "{out}", "--set", "wher=pre_rope"],
                      r"unknown field\(s\) wher for method 'daa'; accepted: layers"),
    "lambda_init bool": (["--method", "daa", "--out", "{out}", "--set", "lambda_init=true"],
                         r"lambda_init=True: must be a finite number or 'depth'"),
    "layers select nothing": (["--method", "daa", "--out", "{out}", "--set", "layers=every:2:5"],
                              r"layers='every:2:5' selects no layer of a model with 2 layers"),
    "scheduler": (["--method", "daa", "--out", "{out}", "--lr-scheduler", "cosine_restarts"],
                  r"lr_scheduler='cosine_restarts'; choose one of linear, constant"),
    "dtype": (["--method", "daa", "--out", "{out}", "--dtype", "float8"], r"dtype='float8'; choose one of float32"),
    "noise mix": (["--method", "daa", "--out", "{out}", "--noise-mix", "0.5,1.0"],
                  r"--noise-mix 1 is out of range: give numbers in \[0, 1\)"),
    "warmup": (["--method", "daa", "--out", "{out}", "--warmup-steps", "-1"],
               r"warmup_steps=-1: must be an integer >= 0"),
    "weight decay": (["--method", "daa", "--out", "{out}", "--weight-decay", "-0.1"], r"weight_decay >= 0"),
    "noise 1.0": (["--method", "daa", "--out", "{out}", "--noise", "1.0"], r"noise=1.0: must be a ratio in \[0, 1\)"),
    "steps 0": (["--method", "daa", "--out", "{out}", "--steps", "0"], r"steps=0: must be an integer >= 1"),
    "threads 0": (["--method", "daa", "--out", "{out}", "--threads", "0"], r"--threads 0: give an integer >= 1"),
    "data bad line": (["--method", "daa", "--out", "{out}", "--data", "{badline}"], r"badline.jsonl:2: invalid JSON"),
    "data missing": (["--method", "daa", "--out", "{out}", "--data", "{root}/nope.jsonl"], r"no such data file"),
    "config missing": (["--config", "{root}/nope.json", "--out", "{out}"], r"--config .*nope.json: no such file"),
    "config invalid JSON": (["--config", "{cfg_bad}", "--out", "{out}"], r"bad.json:2: invalid JSON"),
    "config unknown field": (["--config", "{cfg_unknown}", "--out", "{out}"],
                             r"unknown field\(s\) stepz; accepted: model, method, data"),
    "config not an object": (["--config", "{cfg_list}", "--out", "{out}"], r"expected an object of TrainConfig fields"),
    "config bad type": (["--config", "{cfg_type}", "--out", "{out}"], r"learning_rate='fast': must be a number > 0"),
    "model missing": (["--method", "daa", "--out", "{out}", "--model", "{root}/no/such/model"],
                      r"no such model file or folder"),
    "top layers 0": (["--method", "none", "--out", "{out}", "--top-layers", "0"],
                     r"top_layers=0: must be an integer >= 1 \(unset: all layers\)"),
    "top layers all": (["--method", "none", "--out", "{out}", "--top-layers", "2"],
                       r"top_layers=2: accepted 1 \.\. 1 for this 2-layer model"),
    "method lr alone": (["--method", "daa", "--out", "{out}", "--method-lr", "1e-3"],
                        r"method_lr sets the method's own rate .* it needs --attention or --lora"),
    "non-finite loss": (["--method", "daa", "--out", "{out}", "--model", "{nanmodel}"],
                        r"non-finite training loss \(nan\) at step 1; training stopped .* Lower --lr"),
}


@pytest.mark.parametrize("case", list(TRAIN_CASES))
def test_train_user_errors(case: str, f: dict[str, Path], tmp_path: Path) -> None:
    args, pattern = TRAIN_CASES[case]
    out = tmp_path / "run"
    args = fmt(args, {**f, "out": out})
    if "--model" not in args:
        args += ["--model", str(f["llama"])]
    extra = ["--batch-size", "2", "--no-progress", "--synthetic-examples", "8"]
    if "--steps" not in args:
        extra += ["--steps", "1"]
    assert_user_error(invoke(["train", *args, *extra]), pattern)
    assert not out.exists()


def test_every_command_help_has_an_example_and_threads() -> None:
    for command in ("train", "eval", "inspect", "bench", "demo", "robustness", "methods"):
        result = invoke([command, "--help"])
        assert result.exit_code == 0, result.output
        assert "Example: attndenoise " + command in " ".join(result.output.split()), command
        if command != "methods":  # listing methods computes nothing
            assert "--threads" in result.output, command


def test_methods_name_lists_fields_with_defaults_and_help() -> None:
    result = invoke(["methods", "sra"])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    # SRAConfig's own defaults and its docstring's Attributes entries (hand-copied here)
    assert re.search(r"│ b\s+│ 100\s+│ protected leading tokens", result.output)
    assert re.search(r"│ short_prompt\s+│ 'skip'\s+│ what happens to a rule", result.output)
    assert "anneal_steps" in text and "unused: sra has no lambda schedule" in text
    assert_user_error(invoke(["methods", "nope"]), r"unknown method 'nope'; known methods: daa, dex")


# -- warnings, not errors: own words outside the vocabulary -----------------------------------------------------------


def test_data_outside_the_vocabulary_warns_with_the_share_and_the_fix(f: dict[str, Path], tmp_path: Path) -> None:
    # Words the tiny tokenizer does not know; hand count per record (the vocabulary has "the", "." and "?"):
    # "Zorblat quuxes the frobnitz ." 3 of 5 unknown, "Mimble wamble the frobnitz ." 3 of 5, "Who quuxes ?" 2 of 3,
    # "Zorblat" 1 of 1: 9 of 14, so 18 of 28 for the two records.
    rec = {"documents": ["Zorblat quuxes the frobnitz.", "Mimble wamble the frobnitz."], "gold": 0,
           "question": "Who quuxes?", "answer": "Zorblat"}
    data = tmp_path / "own.jsonl"
    data.write_text((json.dumps(rec) + "\n") * 2)
    res = invoke(["eval", "--model", str(f["llama"]), "--data", str(data), "--noise", "as-is", "--n", "2",
                  "--max-new-tokens", "2", "--out", str(tmp_path / "e")])
    assert res.exit_code == 0, res.output
    assert re.search(r"warning: .*own.jsonl: the tokenizer maps 64% of the tokens \(18 of 28\) to its unknown "
                     r"token '<unk>'.*--model smollm2-135m", " ".join(res.output.split())), res.output
    run = tmp_path / "r"
    res = invoke(["train", "--model", str(f["llama"]), "--method", "daa", "--data", str(data), "--out", str(run),
                  "--steps", "1", "--batch-size", "2", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert re.search(r"warning: training data .*own.jsonl: the tokenizer maps \d+% of the tokens", res.output)


# -- a run killed during training, then eval and resume ---------------------------------------------------------------

SLOW_CLI = textwrap.dedent("""
    import sys, time
    import torch
    torch.set_num_threads(1)
    from transformers import TrainerCallback
    import attndenoise  # noqa: F401  (attndenoise.train is also the name of the train() function)
    T = sys.modules["attndenoise.train"]

    class Slow(TrainerCallback):  # leaves time to kill the run after a checkpoint
        def on_step_end(self, args, state, control, **kwargs):
            time.sleep(0.4)

    real = T.train
    T.train = lambda config, **kw: real(config, callbacks=[Slow()], **kw)
    from attndenoise.cli import app
    app(sys.argv[1:])
""")


def test_killed_training_is_refused_by_eval_and_resumed_only_with_its_settings(f: dict[str, Path],
                                                                             tmp_path: Path) -> None:
    out = tmp_path / "killed"
    args = ["train", "--model", str(f["llama"]), "--method", "daa", "--data", str(f["data"]), "--out", str(out),
            "--steps", "6", "--save-steps", "2", "--batch-size", "2", "--lr", "1e-2", "--no-progress"]
    proc = subprocess.Popen([sys.executable, "-c", SLOW_CLI, *args], env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not (out / "checkpoint-2").is_dir():
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:] if proc.stderr else ""
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "run.json").exists() and not (out / WEIGHTS_NAME).exists()
    last = get_last_checkpoint(str(out))
    assert last is not None
    # The checkpoint holds the trained tensors, not the base model (its weights file is 50x larger here).
    assert not (Path(last) / "model.safetensors").exists()
    assert (Path(last) / "attndenoise_trainable.safetensors").stat().st_size * 10 < \
        (f["llama"] / "model.safetensors").stat().st_size

    assert_user_error(invoke(["eval", "--model", str(f["llama"]), "--adapter", str(out), "--out",
                              str(tmp_path / "e")]), r"holds checkpoints but no run.json: the run did not finish; "
                      r"continue it with `attndenoise train --resume")
    assert not (tmp_path / "e").exists()
    before = sorted(p.name for p in out.iterdir())
    # other settings: refused, naming each changed field with both values
    line = assert_user_error(invoke([*args, "--resume", "--lr", "2e-2", "--seed", "1"]),
                             r"checkpoint-\d was trained with other settings \(learning_rate: 0.01 in the checkpoint, "
                             r"0.02 now; seed: 0 in the checkpoint, 1 now\).*--force-resume")
    assert "steps" not in line.split("(")[1].split(")")[0]  # only what changed is named
    assert sorted(p.name for p in out.iterdir()) == before
    # the same settings: continues to the end
    res = invoke([*args, "--resume"])
    assert res.exit_code == 0, res.output
    run = json.loads((out / "run.json").read_text())
    assert run["resumed_from"] == last and run["steps"] == 6 and run["resume_overrides"] == []
    # resuming the finished run changes nothing
    stamp = (out / "run.json").read_bytes(), (out / "run.json").stat().st_mtime_ns
    res = invoke([*args, "--resume"])
    assert res.exit_code == 0 and "nothing to do" in res.output, res.output
    assert ((out / "run.json").read_bytes(), (out / "run.json").stat().st_mtime_ns) == stamp
    assert_user_error(invoke([*args, "--resume", "--steps", "8"]),
                      r"holds a finished run trained with other settings \(steps: 6 in run.json, 8 now\)")
    assert ((out / "run.json").read_bytes(), (out / "run.json").stat().st_mtime_ns) == stamp


def test_force_resume_records_the_changed_settings(f: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = ["train", "--model", str(f["llama"]), "--method", "daa", "--data", str(f["data"]), "--out", str(out),
            "--steps", "4", "--save-steps", "2", "--batch-size", "2", "--no-progress"]
    assert invoke(args).exit_code == 0
    (out / "run.json").unlink()  # as if killed after the last checkpoint
    shutil.rmtree(out / "checkpoint-4")
    res = invoke([*args, "--resume", "--force-resume", "--lr", "5e-4"])
    assert res.exit_code == 0, res.output
    run = json.loads((out / "run.json").read_text())
    assert run["resume_overrides"] == [{"checkpoint": "checkpoint-2",
                                        "changed": {"learning_rate": {"recorded": 0.001, "now": 0.0005}}}]
    assert run["config"]["learning_rate"] == 0.0005 and run["config"]["force_resume"] is True


def test_config_file_values_and_flags_that_override_them(f: dict[str, Path], tmp_path: Path) -> None:
    cfg = tmp_path / "daa.json"
    cfg.write_text(json.dumps({"method": "daa", "steps": 3, "learning_rate": 5e-3, "warmup_steps": 1,
                               "lr_scheduler": "constant_with_warmup", "weight_decay": 0.01, "noise_mix": [0.0, 0.5],
                               "method_options": {"lambda_schedule": "linear", "layers": [1]}}))
    out = tmp_path / "run"
    res = invoke(["train", "--config", str(cfg), "--model", str(f["llama"]), "--data", str(f["data"]), "--out",
                  str(out), "--steps", "2", "--set", "layers=[0]", "--batch-size", "2", "--no-progress",
                  "--threads", "1"])
    assert res.exit_code == 0, res.output
    run = json.loads((out / "run.json").read_text())
    c = run["config"]
    assert (c["steps"], c["learning_rate"], c["warmup_steps"], c["lr_scheduler"], c["weight_decay"]) == \
        (2, 5e-3, 1, "constant_with_warmup", 0.01)  # --steps wins, the file gives the rest
    assert c["noise_mix"] == [0.0, 0.5] and c["method_options"] == {"lambda_schedule": "linear", "layers": [0]}
    # anneal_steps was not given: the ramp follows the run length (2 steps)
    assert run["method_config"]["anneal_steps"] == 2 and run["method_config"]["layers"] == [0]


def test_eval_applies_an_inference_only_method(f: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "sra"
    res = invoke(["eval", "--model", str(f["llama"]), "--method", "sra", "--set", "b=1", "--set", "t=4",
                  "--n", "2", "--noise", "0", "--max-new-tokens", "2", "--out", str(out)])
    assert res.exit_code == 0, res.output
    data = json.loads((out / "results.json").read_text())
    assert data[0]["label"] == "llama+sra"
    assert data[0]["settings"]["method"]["method"] == "sra" and data[0]["settings"]["method"]["b"] == 1


def test_train_notes_settings_that_leave_lambda_near_zero() -> None:
    """The note that the settings leave lambda near zero: printed for the literal "paper" schedule (measured on the
    tiny model to give the base model's accuracy), not when lambda follows the linear schedule or nothing has a
    lambda schedule."""
    from attndenoise.cli.train import lambda_note
    from attndenoise.train import TrainConfig

    note = lambda_note(TrainConfig(method="daa", steps=30))
    assert note is not None and "lambda_schedule=paper" in note and "--set lambda_schedule=linear" in note
    assert "\n" not in note
    assert lambda_note(TrainConfig(method="daa", method_options={"lambda_schedule": "linear"})) is None
    for quiet in (TrainConfig(method="none"), TrainConfig(method="lora"), TrainConfig(method="opamp"),
                  TrainConfig(method="daa", attention=True), TrainConfig(method="daa", lora=True)):
        assert lambda_note(quiet) is None, quiet.method
