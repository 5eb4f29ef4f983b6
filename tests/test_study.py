"""``attndenoise study`` end to end on a tiny random model: the answers it stores (computed with the lower layers'
cache shared by every model) equal each trained model's own plain ``generate`` on the full prompt; the validation
score equals the model's own loss; resuming retrains and re-answers nothing; a new row is answered alone; the
verdict rule on hand-made cases; one-line CLI errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from models import byte_level_llama_folder
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from attndenoise.cli import app
from attndenoise.data.formatting import encode_for_training
from attndenoise.data.retrieval import LITM_FORMAT, PassagePool, multidoc_examples, read_multidoc_qa, split_records
from attndenoise.evaluate import answer_text, eos_token_ids
from attndenoise.study import StudyConfig, StudyError, expand_rows, parse_row, run_study
from attndenoise.study_report import verdict
from attndenoise.train import load_trained


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return byte_level_llama_folder(tmp_path_factory.mktemp("model"), layers=3, positions=8192,
                                   tie_word_embeddings=False)


def nq_file(path: Path, n: int = 60) -> Path:
    subjects = ["river", "mountain", "castle", "poet", "engine", "island"]
    lines = []
    for i in range(n):
        s = subjects[i % len(subjects)]
        lines.append(json.dumps({
            "question": f"which {s} is number {i}", "answers": [f"answer{i}x"],
            "ctxs": [{"title": f"{s.title()} {i}", "text": f"The {s} number {i} is answer{i}x.", "isgold": True}],
        }))
    path.write_text("\n".join(lines) + "\n")
    return path


def small(tmp: Path, folder: Path, **kw: object) -> StudyConfig:
    base = dict(data=str(nq_file(tmp / "nq.jsonl")), out=str(tmp / "out"), model=str(folder),
                rows=("none", "daa+attn", "lora", "opamp+lora"), seeds=(0, 1), top_layers=1, steps=2, n=2,
                val_n=3, attention_n=1, needle_n=1, max_new_tokens=3, train_distractors=1,
                lr_grid={"attention": (1e-3, 1e-2), "lora": (1e-3,), "alone": (1e-3,)}, schedules=("paper",),
                settings=(("k0", 0, "random"), ("k9-middle", 9, "middle"), ("k19", 19, "random")), progress=False)
    base.update(kw)
    return StudyConfig(**base)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory, tiny_folder: Path) -> tuple[StudyConfig, list[str]]:
    tmp = tmp_path_factory.mktemp("study")
    cfg = small(tmp, tiny_folder)
    logs: list[str] = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ATTNDENOISE_CACHE", str(tmp / "cache"))
        run_study(cfg, log=logs.append)
    return cfg, logs


def test_stored_answers_equal_each_models_plain_generate(finished: tuple[StudyConfig, list[str]],
                                                         tiny_folder: Path) -> None:
    cfg, _ = finished
    out = Path(cfg.out)
    tok = AutoTokenizer.from_pretrained(tiny_folder)
    records = read_multidoc_qa(Path(cfg.data))
    test = split_records(records, "test")[: cfg.n]
    pool = PassagePool.from_records(records)
    checked = 0
    for key in ("base", "none@0", "daa+attn@1", "lora@0", "opamp+lora@1"):
        model = AutoModelForCausalLM.from_pretrained(tiny_folder).eval()
        if key != "base":
            label, seed = key.split("@")
            lr = json.loads((out / "selection.json").read_text())["learning_rate"][parse_row(label).protocol]
            run = next(p for p in (out / "runs").iterdir() if p.name.startswith(f"{label}-s{seed}-lr{lr:g}"))
            model = load_trained(model, run)  # unmerged LoRA: the study merges; answers must still agree
        eos = eos_token_ids(model, tok)
        for name, k, position in cfg.settings:
            for ex in multidoc_examples(test, k, "hard" if k else "random", gold_position=position, seed=0, pool=pool):
                enc = encode_for_training(ex, tok, fmt=LITM_FORMAT)
                prompt = torch.tensor([enc.input_ids[: enc.prompt_length]])
                with torch.no_grad():
                    gen = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                         max_new_tokens=cfg.max_new_tokens, eos_token_id=eos, pad_token_id=2)
                want = answer_text(tok, gen[0, prompt.shape[1]:].tolist(), eos)
                saved = json.loads(_file_for(out, name, ex.question).read_text())
                assert saved["answers"][key]["prediction"] == want, (key, name)
                checked += 1
    assert checked == 5 * len(cfg.settings) * cfg.n


def _file_for(out: Path, setting: str, question: str) -> Path:
    import hashlib

    return out / "eval" / setting / f"{hashlib.sha256(question.encode()).hexdigest()[:16]}.json"


def test_validation_score_is_the_models_own_answer_loss(finished: tuple[StudyConfig, list[str]],
                                                        tiny_folder: Path) -> None:
    cfg, _ = finished
    sel = json.loads((Path(cfg.out) / "selection.json").read_text())
    tok = AutoTokenizer.from_pretrained(tiny_folder)
    model = AutoModelForCausalLM.from_pretrained(tiny_folder).eval()
    records = read_multidoc_qa(Path(cfg.data))
    val = split_records(records, "validation")[: cfg.val_n]
    exs = multidoc_examples(val, cfg.train_distractors, "hard", "random", seed=0,
                            pool=PassagePool.from_records(records))
    total, count = 0.0, 0
    for ex in exs:
        enc = encode_for_training(ex, tok, cfg.max_length, fmt=LITM_FORMAT)
        labels = torch.tensor([enc.labels])
        with torch.no_grad():  # the stock full forward and its own loss: mean over the answer tokens
            loss = model(input_ids=torch.tensor([enc.input_ids]), labels=labels).loss
        n = int((labels[0, 1:] != -100).sum())
        total, count = total + float(loss) * n, count + n
    assert sel["scores"]["base"] == pytest.approx(total / count, rel=1e-5)
    # the chosen learning rate of a protocol is its baseline's best on validation
    att = {float(k.split("-lr")[1]): v for k, v in sel["scores"].items() if k.startswith("none-s0-lr")}
    assert sel["learning_rate"]["attention"] == min(att, key=att.get)


def test_attention_to_gold_equals_the_stock_eager_maps(finished: tuple[StudyConfig, list[str]],
                                                       tiny_folder: Path) -> None:
    """The stored share of the last prompt position's attention on the gold passage (top layers, mean over heads)
    against transformers' own eager attention probabilities of the full forward, for the base and a trained row
    whose attention is the stock one (``none``: its projections trained)."""
    cfg, _ = finished
    out = Path(cfg.out)
    saved = json.loads((out / "eval" / "attention.json").read_text())
    tok = AutoTokenizer.from_pretrained(tiny_folder)
    records = read_multidoc_qa(Path(cfg.data))
    test = split_records(records, "test")[: cfg.n]
    ex = multidoc_examples(test, 9, "hard", gold_position="middle", seed=0,
                           pool=PassagePool.from_records(records))[: cfg.attention_n]
    sel = json.loads((out / "selection.json").read_text())
    run = out / "runs" / f"none-s0-lr{sel['learning_rate']['attention']:g}"
    for key, model in [("base", None), ("none@0", run)]:
        stock = AutoModelForCausalLM.from_pretrained(tiny_folder, attn_implementation="eager").eval()
        m = stock if model is None else load_trained(stock, model).eval()
        shares = []
        for e in ex:
            enc = encode_for_training(e, tok, fmt=LITM_FORMAT)
            ids = enc.input_ids[: enc.prompt_length]
            gold = torch.zeros(len(ids), dtype=torch.bool)
            for a, b in enc.gold_spans:
                gold[a:b] = True
            with torch.no_grad():
                att = m(input_ids=torch.tensor([ids]), output_attentions=True).attentions
            top = att[-cfg.top_layers:]  # the trained (top) layers
            shares.append([float(a[0, :, -1, gold].sum(-1).mean()) for a in top])
        want = sum(sum(p) / len(p) for p in shares) / len(shares)
        assert saved[key]["result"]["mean_gold"] == pytest.approx(want, rel=1e-4, abs=1e-6), key


def test_resume_trains_and_answers_nothing_new_and_a_new_row_is_answered_alone(
        finished: tuple[StudyConfig, list[str]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg, first_logs = finished
    assert any(m.startswith("training ") for m in first_logs)
    monkeypatch.setenv("ATTNDENOISE_CACHE", str(Path(cfg.out).parent / "cache"))
    out = Path(cfg.out)
    stamp = {p: p.stat().st_mtime_ns for p in (out / "eval").rglob("*.json")}
    logs: list[str] = []
    run_study(cfg, log=logs.append)
    assert not [m for m in logs if m.startswith("training ")]
    assert {p: p.stat().st_mtime_ns for p in (out / "eval").rglob("*.json")} == stamp
    grown = StudyConfig(**{**cfg.__dict__, "rows": (*cfg.rows, "dint+attn"), "seeds": (0,)})
    logs = []
    run_study(grown, log=logs.append)
    assert [m for m in logs if m.startswith("training ")] == [
        m for m in logs if m.startswith("training dint+attn-s0")]
    saved = json.loads(next((out / "eval" / "k0").glob("*.json")).read_text())["answers"]
    assert "dint+attn@0" in saved and "daa+attn@1" in saved
    report = (out / "report.md").read_text()
    assert "dint+attn" in report and "Protocol `attention`" in report and "Protocol `lora`" in report


def test_validation_scores_outlive_their_runs_and_a_run_with_other_settings_is_refused(
        finished: tuple[StudyConfig, list[str]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    cfg, _ = finished
    monkeypatch.setenv("ATTNDENOISE_CACHE", str(Path(cfg.out).parent / "cache"))
    out = tmp_path / "copy"
    shutil.copytree(cfg.out, out)
    sel = json.loads((out / "selection.json").read_text())
    chosen = f"none-s0-lr{sel['learning_rate']['attention']:g}"
    # A validation-only run (not a row of the study at the chosen rate) is not retrained once its score is kept.
    loser = next(k for k in sel["scores"] if k.startswith("none-s0-lr") and k != chosen)
    shutil.rmtree(out / "runs" / loser)
    logs: list[str] = []
    run_study(StudyConfig(**{**cfg.__dict__, "out": str(out)}), log=logs.append)
    assert not [m for m in logs if m.startswith("training ")]
    # Other training settings: the kept scores do not count, and the finished runs in the folder are refused.
    with pytest.raises(StudyError, match=r"holds a run trained with other settings \(steps: 2 there, 3 now\)"):
        run_study(StudyConfig(**{**cfg.__dict__, "out": str(out), "steps": 3}), log=logs.append)


def test_parse_row_and_errors() -> None:
    assert parse_row("daa+attn").baseline == "none" and parse_row("daa+attn").protocol == "attention"
    assert parse_row("opamp+lora").baseline == "lora"
    assert parse_row("dint").baseline == "lora~dint" and parse_row("lora~dint").matched == "dint"
    for bad in ("sra+attn", "daa+x", "nope", "lora~sra"):
        with pytest.raises(StudyError, match="accepted"):
            parse_row(bad)


def test_named_row_sets() -> None:
    assert expand_rows(["default"]) == ("none", "lora", "daa+attn", "diff+attn", "dint+attn", "opamp+lora")
    papers = expand_rows(["papers"])
    assert len(papers) == 11 and papers[-1] == "opamp+lora" and "lowrank_dint+attn" in papers
    assert expand_rows(["daa", "default", "daa"]) == ("daa", "none", "lora", "daa+attn", "diff+attn", "dint+attn",
                                                       "opamp+lora")
    full = expand_rows(["full"])
    assert set(papers) <= set(full) and "lora~daa" in full and "daa+lora" in full


def test_verdict_hand_cases() -> None:
    assert verdict([30.0, 32.0], [20.0, 25.0]).startswith("better, +8.5")
    assert verdict([10.0, 12.0], [20.0, 25.0]).startswith("worse")
    assert verdict([22.0, 30.0], [20.0, 25.0]).startswith("within the seed spread")
    assert "one seed" in verdict([30.0], [20.0])


def test_cli_errors_are_one_line(tmp_path: Path) -> None:
    runner = CliRunner()
    data = nq_file(tmp_path / "nq.jsonl")
    r = runner.invoke(app, ["study", "--data", str(data), "--model", "tiny", "--rows", "daa+bogus",
                            "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "unknown row 'daa+bogus'" in r.output and "Traceback" not in r.output
    r = runner.invoke(app, ["study", "--data", str(tmp_path / "missing.jsonl"), "--model", "tiny"])
    assert r.exit_code == 2 and "no such file" in r.output
    r = runner.invoke(app, ["study", "--data", str(data), "--model", "tiny", "--seeds", "x"])
    assert r.exit_code == 2
    assert not (tmp_path / "o").exists()


def test_stats_hand_computed() -> None:
    from attndenoise.stats import mean_sd, wilson_interval

    assert mean_sd([1.0, 2.0, 3.0, 4.0]) == pytest.approx((2.5, 1.2909944))  # sqrt(5/3)
    assert mean_sd([7.0]) == (7.0, 0.0)
    assert wilson_interval(5, 10) == pytest.approx((0.23659, 0.76341), abs=1e-4)


def test_seed_verdict_and_paired_bootstrap_hand_cases() -> None:
    from attndenoise.stats import paired_bootstrap, seed_verdict

    assert seed_verdict([3.0, 4.0], [1.0, 2.5]) == ("better", pytest.approx(1.75))
    assert seed_verdict([1.0, 2.5], [3.0, 4.0])[0] == "worse"
    assert seed_verdict([1.0, 3.5], [3.0, 4.0])[0] == "within"  # overlapping seeds, whatever the means
    assert seed_verdict([2.0], [1.0, 1.5]) == ("one seed", pytest.approx(0.75))
    assert seed_verdict([], [1.0])[0] == "not measured"
    # Constant differences: every resample has that mean.
    assert paired_bootstrap([2.0, 2.0, 2.0]) == pytest.approx((2.0, 2.0))
    # Two questions, differences 0 and 1: a resample's mean is 0, 0.5 or 1 with probability 1/4, 1/2, 1/4, so the
    # 2.5% and 97.5% quantiles are 0 and 1.
    assert paired_bootstrap([0.0, 1.0]) == pytest.approx((0.0, 1.0))
    # 20 questions, one difference of 1: the resample mean is (count of it drawn) / 20, count ~ Binomial(20, 1/20);
    # P(count = 0) = 0.95^20 = 0.358 > 2.5%, and P(count >= 4) = 0.016 < 2.5% <= P(count >= 3) = 0.075.
    assert paired_bootstrap([1.0] + [0.0] * 19) == pytest.approx((0.0, 3 / 20))


def test_question_interval_reads_each_question_of_each_seed() -> None:
    from attndenoise.study_report import question_noisy

    def answers(em: dict[str, list[float]]) -> list[dict[str, object]]:
        return [{"answers": {k: {"best_subspan_em": v[q]} for k, v in em.items()}} for q in range(2)]

    got = question_noisy({
        "k9-first": answers({"a@0": [1, 0], "a@1": [1, 1]}), "k9-middle": answers({"a@0": [0, 0], "a@1": [1, 0]}),
        "k9-last": answers({"a@0": [1, 0], "a@1": [0, 0]}), "k19": answers({"a@0": [1, 1], "a@1": [0, 1]}),
    }, ["a@0", "a@1"])
    # question 0: seed 0 (2/3 + 1) / 2 = 5/6, seed 1 (2/3 + 0) / 2 = 1/3; question 1: seed 0 (0 + 1) / 2, seed 1
    # (1/3 + 1) / 2 = 2/3; in %, averaged over the seeds
    assert got == pytest.approx([100 * (5 / 6 + 1 / 3) / 2, 100 * (1 / 2 + 2 / 3) / 2])
    assert question_noisy({"k19": answers({"a@0": [1, 1]})}, ["a@0"]) is None  # no 9-distractor setting


def test_two_map_flag_is_the_methods_own() -> None:
    from attndenoise import benchmark, registry

    # DAA, DiffQ, DiffK, DIFF, OpAmp and both DINTs combine two softmax maps; DiffV and DEX one, SRA re-weights one
    assert benchmark.TWO_MAP == {"daa", "diffq", "diffk", "diff", "opamp", "dint", "lowrank_dint"}
    assert registry.trainable_methods() == sorted(set(registry.METHODS) - {"sra"})


def test_method_lr_trains_the_method_at_its_own_rate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``method_lr``: at the run's own rate it is the run without it (the Trainer's AdamW); at a negligible rate the
    method's parameters stay put while the projections train as in a run whose method cannot move."""
    from attndenoise.models import load_model_and_tokenizer
    from attndenoise.patch import method_modules
    from attndenoise.train import train

    monkeypatch.setenv("ATTNDENOISE_CACHE", str(tmp_path / "cache"))

    def run(name: str, **kw: object) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], list[float]]:
        m, tok = load_model_and_tokenizer("tiny")
        r = train(model=m, tokenizer=tok, method="daa", attention=True, steps=3, batch_size=2, learning_rate=1e-3,
                  logging_steps=1, out=str(tmp_path / name), progress=False, **kw)
        meth = {n: p.detach().clone() for i, mod in method_modules(r.model).items() for n, p in mod.named_parameters()}
        proj = {n: p.detach().clone() for n, p in r.model.named_parameters() if p.requires_grad and "q_proj" in n}
        return meth, proj, [h["loss"] for h in r.run["loss_history"]]

    m0, p0, l0 = run("plain")
    m1, p1, l1 = run("same", method_lr=1e-3)
    assert l1 == pytest.approx(l0, rel=1e-6)
    assert all(torch.allclose(m0[k], m1[k], atol=1e-7) for k in m0)
    m2, _, _ = run("slow", method_lr=1e-12)
    fresh, _ = load_model_and_tokenizer("tiny")
    import attndenoise as ad

    ad.apply(fresh, ad.registry.config_for("daa", anneal_steps=3))
    init = {n: p.detach() for mod in method_modules(fresh).values() for n, p in mod.named_parameters()}
    assert all(torch.allclose(m2[k], init[k], atol=1e-8) for k in m2)  # the method barely moved
    assert any(not torch.allclose(m0[k], init[k], atol=1e-6) for k in m0)  # at 1e-3 it did
    with pytest.raises(Exception, match="method_lr sets the method's own rate"):
        train(method="daa", method_lr=1e-3, out=str(tmp_path / "x"), progress=False)


def test_trained_models_share_the_bases_frozen_parts_and_compute_their_own_logits(
        finished: tuple[StudyConfig, list[str]], tiny_folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``Study.trained`` keeps one copy of the frozen layers, embeddings and (untrained) head for every model; the
    shared model's logits equal those of the run loaded on its own into a fresh model (its LoRA unmerged)."""
    from attndenoise.frozen import decoder_layers
    from attndenoise.study import Study

    cfg, _ = finished
    out = Path(cfg.out)
    monkeypatch.setenv("ATTNDENOISE_CACHE", str(out.parent / "cache"))
    study = Study(cfg, log=lambda _: None)
    prompt = torch.randint(0, 200, (1, 12))
    lr = json.loads((out / "selection.json").read_text())["learning_rate"]
    for label in ("daa+attn", "opamp+lora"):
        run = next(p for p in (out / "runs").iterdir()
                   if p.name.startswith(f"{label}-s0-lr{lr[parse_row(label).protocol]:g}"))
        shared = study.trained(run)
        assert shared.get_output_embeddings() is study.base.get_output_embeddings()
        assert shared.get_input_embeddings() is study.base.get_input_embeddings()
        assert all(decoder_layers(shared)[i] is decoder_layers(study.base)[i] for i in range(study.first))
        alone = load_trained(AutoModelForCausalLM.from_pretrained(tiny_folder), run)
        with torch.no_grad():
            want = alone(input_ids=prompt).logits
            got = shared(input_ids=prompt).logits
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_resumed_study_reports_progress_weighted_by_setting_cost(finished: tuple[StudyConfig, list[str]],
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """A resumed study with every answer stored: each question advances the share done by its setting's cost
    (1 + k/4: k0 1, k9 3.25, k19 5.75), and no ETA is promised from stored answers (they took no time)."""
    from dataclasses import replace

    cfg, _ = finished
    capsys.readouterr()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ATTNDENOISE_CACHE", str(Path(cfg.out).parent / "cache"))
        run_study(replace(cfg, progress=True), log=lambda _: None)
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("test answers:")]
    assert len(lines) == 3 * cfg.n
    total = (1 + 3.25 + 5.75) * cfg.n  # n = 2 questions per setting
    shares = [round(100 * c / total) for c in (1, 2, 2 + 3.25, 2 + 6.5, 8.5 + 5.75, 20)]
    assert [ln.split("(")[1].split("%")[0] for ln in lines] == [str(s) for s in shares]
    assert all(ln.endswith("ETA ?") for ln in lines[:-1]) and lines[-1].endswith("ETA 0 s")
