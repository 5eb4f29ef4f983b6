"""The robustness run's pieces: the interval, SRA selection, an end-to-end resumable run on a tiny random model, and
one-line CLI errors."""

from __future__ import annotations

import json
import math
import re
import string
from pathlib import Path

import pytest
from models import byte_level_llama_folder
from typer.testing import CliRunner

import attndenoise.evaluate as evaluate
from attndenoise import ConfigError
from attndenoise.cli import app
from attndenoise.robustness import RobustnessConfig, choose_sra, run_robustness, wilson_interval


def test_wilson_interval_hand_computed() -> None:
    # 5 of 10: centre 0.5, half-width 1.96 sqrt(0.025 + 0.009604) / 1.38416 = 0.26340.
    lo, hi = wilson_interval(5, 10)
    assert lo == pytest.approx(0.23659, abs=1e-4) and hi == pytest.approx(0.76341, abs=1e-4)
    # 0 of 10: the textbook Wilson upper bound 0.2775 (a normal interval would be [0, 0]).
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.27753, abs=1e-4)
    assert wilson_interval(10, 10)[1] == 1.0


def test_choose_sra_takes_the_best_and_the_first_of_ties() -> None:
    grid = ({"b": 1}, {"b": 2}, {"b": 3})
    scores = {"sra-val-0": {"best_subspan_em": 0.4}, "sra-val-1": {"best_subspan_em": 0.5},
              "sra-val-2": {"best_subspan_em": 0.5}}
    assert choose_sra(scores, grid) == ({"b": 2}, 1)
    assert choose_sra({k: {"best_subspan_em": 0.3} for k in scores}, grid) == ({"b": 1}, 0)


# -- a tiny random model with a byte-level tokenizer (reads any text) ---------------------------------------------


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return byte_level_llama_folder(tmp_path_factory.mktemp("model"))


def nq_file(path: Path, n: int = 30) -> Path:
    subjects = ["river", "mountain", "castle", "poet", "engine", "island"]
    lines = []
    for i in range(n):
        s = subjects[i % len(subjects)]
        lines.append(json.dumps({
            "question": f"which {s} is number {i}",
            "answers": [f"answer{i}x", f"alt{i}y"],
            "ctxs": [{"title": f"{s.title()} {i}", "text": f"The {s} number {i} is answer{i}x, people say.",
                      "isgold": True, "hasanswer": True}],
        }))
    path.write_text("\n".join(lines) + "\n")
    return path


def _squad(text: str) -> str:
    """A second SQuAD normaliser, written here, for the independent check of the stored scores."""
    text = "".join(c for c in text.lower() if c not in set(string.punctuation))
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def test_run_writes_report_and_resumes(tiny_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ATTNDENOISE_CACHE", str(tmp_path / "cache"))
    data = nq_file(tmp_path / "nq.jsonl")
    out = tmp_path / "out"
    cfg = RobustnessConfig(data=str(data), model=str(tiny_folder), out=str(out), n=3, distractors=(0, 2),
                           position_distractors=2, positions=("first", "last"), attention_n=2,
                           sra_grid=({"b": 1, "t": 2}, {"b": 2, "t": 3}), sra_val_n=2, sra_distractors=(2,),
                           max_new_tokens=4, batch_size=2)
    report = run_robustness(cfg)
    text = report.read_text()
    assert "| 2 | hard |" in text and "| 2 | random |" in text and "## SRA" in text
    for png in ("distractors.png", "position.png", "attention.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    parts = sorted(p.stem for p in (out / "parts").glob("*.json"))
    # The test split gets the authors' constants and the grid's best (never the authors' here: not in this grid).
    assert parts == sorted(["curve-none-0", "curve-random-2", "curve-hard-2", "position-hard-2-first",
                            "position-hard-2-last", "attention-hard-2", "sra-val-0", "sra-val-1",
                            "val-base-hard-2", "sra-test-authors-hard-2", "sra-test-chosen-hard-2"])
    for name in ("curve-hard-2", "position-hard-2-last"):
        r = json.loads((out / "parts" / f"{name}.json").read_text())["result"]
        assert r["n"] == 3 and len(r["predictions"]) == 3
        hits = [any(_squad(a) in _squad(p["prediction"]) for a in p["answers"]) for p in r["predictions"]]
        assert r["best_subspan_em"] == pytest.approx(sum(hits) / 3)
        assert all(set(p["answers"]) >= {p["answer"]} and len(p["answers"]) == 2 for p in r["predictions"])
    results = json.loads((out / "results.json").read_text())
    assert results["meta"]["split_sizes"] == [21, 3, 6] and results["meta"]["test_questions"] == 3

    # A rerun reuses every finished part: nothing is generated again.
    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("a finished part must be reused")

    monkeypatch.setattr(evaluate, "generate_answers", fail)
    run_robustness(cfg)
    # A changed setting re-runs exactly the parts it touches (here: one more gold position).
    monkeypatch.undo()
    monkeypatch.setenv("ATTNDENOISE_CACHE", str(tmp_path / "cache"))
    calls = []
    original = evaluate.generate_answers

    def counting(*args: object, **kwargs: object) -> object:
        calls.append(1)
        return original(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(evaluate, "generate_answers", counting)
    cfg.positions = ("first", "middle", "last")
    run_robustness(cfg)
    assert (out / "parts" / "position-hard-2-middle.json").exists() and len(calls) == 2  # 3 questions, batch 2


def test_cli_errors_are_one_line(tmp_path: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(app, ["robustness", "--data", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "no such data file" in res.output and "Traceback" not in res.output
    data = nq_file(tmp_path / "nq.jsonl")
    res = runner.invoke(app, ["robustness", "--data", str(data), "--kinds", "nearby", "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "accepted: random, hard" in res.output
    res = runner.invoke(app, ["robustness", "--data", str(data), "--model", "./nowhere", "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "no such model file or folder" in res.output
    assert not (tmp_path / "o").exists()  # nothing written for a bad input


# -- training on multi-document QA (the data path of the fine-tuning protocols) ----------------------------------


def test_training_examples_from_a_split_with_hard_distractors(tmp_path: Path) -> None:
    from attndenoise.data.retrieval import read_multidoc_qa, split_records
    from attndenoise.train import TrainConfig, load_training_examples, prompt_format

    data = nq_file(tmp_path / "nq.jsonl")
    cfg = TrainConfig(data=str(data), method="daa", out=str(tmp_path / "run"), distractors=2)
    examples = load_training_examples(cfg)
    train_questions = [r.question for r in split_records(read_multidoc_qa(data), "train")]
    assert [e.question for e in examples] == train_questions and len(examples) == 21
    for e in examples:
        assert len(e.documents) == 3 and len(e.gold) == 1
        i = int(e.question.rsplit(" ", 1)[1])
        assert f"answer{i}x" in e.documents[e.gold[0]] and e.answers == (f"answer{i}x", f"alt{i}y")
        assert not any(f"answer{i}x" in d for j, d in enumerate(e.documents) if j != e.gold[0])
    assert "some of which might be irrelevant" in prompt_format(cfg).instruction
    with pytest.raises(ConfigError, match="do not combine with --noise"):
        TrainConfig(data=str(data), method="daa", distractors=2, noise=0.5)


def test_method_with_attention_trains_on_retrieval_data(tiny_folder: Path, tmp_path: Path) -> None:
    import attndenoise as ad

    data = nq_file(tmp_path / "nq.jsonl")
    run = ad.train(model=str(tiny_folder), method="daa", attention=True, data=str(data), out=str(tmp_path / "run"),
                   distractors=2, steps=3, batch_size=2, max_length=1024, learning_rate=1e-2, progress=False,
                   save_steps=100, logging_steps=1)
    assert run.run["kind"] == "method+attn" and run.run["config"]["prompt"] == "auto"
    losses = [h["loss"] for h in run.run["loss_history"]]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
