"""Evaluation (noisy QA, needle, perplexity), attention measures (docs/methods.md, section Attention measures), plots
and the eval / inspect commands.

References are independent of the code under test: hand-computed SQuAD-style scores, a scripted model whose answers
the test chooses, a plain no-cache greedy loop, a hand-written perplexity sum, the stock model's own eager attention
maps (``attn_implementation="eager"``, ``output_attentions=True``) and explicit maps built with tests/reference.py.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import math
import re
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from matrix import cases
from models import FAMILIES, inputs, tiny
from reference import capture, explicit_map, rope
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

import attndenoise as ad
from attndenoise.cli import app
from attndenoise.data import SyntheticQA, build_noisy_example, encode_for_training
from attndenoise.data.synthetic import ATTRIBUTE_BY_NAME
from attndenoise.evaluate import (
    EvalResults,
    QAResult,
    evaluate_needle,
    evaluate_noisy_qa,
    evaluate_perplexity,
    exact_match,
    generate_answers,
    held_out_texts,
    lenient_match,
    normalize_text,
    read_results,
    token_f1,
    write_results,
)
from attndenoise.measures import example_attention, measure_attention
from attndenoise.plots import (
    accuracy_by_noise,
    accuracy_lines,
    plot_accuracy,
    plot_attention_map,
    plot_attention_to_gold,
    plot_needle,
)
from attndenoise.progress import Progress, eta_seconds, format_seconds
from attndenoise.tiny import tiny_model_path

SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=64, batch_size=8, steps=40, warmup_steps=5, max_position_embeddings=512,
             induction_steps=10)
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_model_path(tmp_path_factory.mktemp("tiny"), threads=1, **SMALL)


def load(path: Path) -> tuple[Any, Any]:
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


# -- metrics ------------------------------------------------------------------------------------------------------


def test_squad_style_metrics_hand_computed() -> None:
    assert normalize_text("The  Denver Broncos!") == "denver broncos"
    assert normalize_text("7 3 9 1 4") == "73914" == normalize_text("73914.")
    # SQuAD dev-set style: several gold answers, max over them.
    assert exact_match("the Denver Broncos.", ["Denver Broncos", "Broncos"]) == 1.0
    assert exact_match("Broncos won", ["Denver Broncos", "Broncos"]) == 0.0
    # "broncos won" vs "denver broncos": 1 common token, P = R = 1/2 -> F1 1/2; vs "broncos": P 1/2, R 1 -> 2/3.
    assert token_f1("Broncos won", ["Denver Broncos", "Broncos"]) == pytest.approx(2 / 3)
    assert token_f1("Broncos won", "Denver Broncos") == pytest.approx(0.5)
    assert token_f1("a red fox", "the red wolf") == pytest.approx(0.5)  # articles dropped: [red fox] vs [red wolf]
    assert token_f1("red red fox", "red fox") == pytest.approx(2 * (2 / 3) * 1 / (2 / 3 + 1))  # multiset overlap 2
    assert token_f1("", "Varnok") == 0.0 and token_f1("the", "a") == 1.0  # both normalise to nothing
    assert token_f1("Kelmir", "Varnok") == 0.0
    # Lenient: gold contained in the prediction (OpAmp / Lost-in-the-Middle), labelled separately.
    assert lenient_match("I think it is Varnok.", "Varnok") == 1.0
    assert exact_match("I think it is Varnok.", "Varnok") == 0.0
    assert lenient_match("Varno", "Varnok") == 0.0
    assert lenient_match("73914 is the key", "7 3 9 1 4") == 1.0


def test_best_subspan_em_hand_computed() -> None:
    from attndenoise.evaluate import best_subspan_em

    # Liu et al.'s metric: any SQuAD-normalised gold answer inside the SQuAD-normalised prediction.
    assert best_subspan_em("The capital of France is Paris.", ["Paris"]) == 1.0
    assert best_subspan_em("It was Wilhelm Conrad Röntgen, in 1901.", ["Röntgen", "W. Röntgen"]) == 1.0
    assert best_subspan_em("It was Marie Curie.", ["Röntgen", "Wilhelm Conrad Röntgen"]) == 0.0
    assert best_subspan_em("the Beatles", ["The Beatles!"]) == 1.0  # articles and punctuation dropped on both sides
    assert best_subspan_em("Parisian food", ["Paris"]) == 1.0  # a substring test, as in the paper's code
    assert best_subspan_em("7 3 9", ["739"]) == 0.0  # no digit joining here (unlike lenient)
    assert best_subspan_em("anything", ["the"]) == 0.0  # an answer that normalises to nothing never matches


# -- a model whose answers the test controls ---------------------------------------------------------------------


class Scripted(nn.Module):
    """Answers each prompt with ``script(question text)``; records what it was given."""

    def __init__(self, tokenizer: Any, script: Any) -> None:
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))
        self.tok, self.script = tokenizer, script
        self.seen: list[tuple[str, list[int]]] = []

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
                 pad_token_id: int, eos_token_id: list[int], **kw: Any) -> torch.Tensor:
        assert kw["do_sample"] is False and kw["use_cache"] is True
        rows = []
        for ids, mask in zip(input_ids.tolist(), attention_mask.tolist(), strict=True):
            first = mask.index(1)
            assert all(m == 1 for m in mask[first:])  # left padding
            prompt = self.tok.decode(ids[first:])
            self.seen.append((prompt, mask))
            question = re.search(r"Question ?: (.*?) ?Answer", prompt.replace("\n", " "))
            assert question is not None, prompt
            answer = self.tok(" " + self.script(question.group(1)), add_special_tokens=False)["input_ids"]
            rows.append((answer + [eos_token_id[0]])[:max_new_tokens])
        width = max(len(r) for r in rows)
        new = torch.tensor([r + [pad_token_id] * (width - len(r)) for r in rows])
        return torch.cat([input_ids, new], dim=1)


def scripted_qa(tok: Any, n: int, seed: int) -> tuple[Scripted, dict[str, int]]:
    """Example i (in SyntheticQA test order) answered: i%4 == 0 correct, 1 with an extra word, 2 wrong, 3 'the X'."""
    raw = SyntheticQA(seed, split="test").examples(n)
    kind = {ex.question: i % 4 for i, ex in enumerate(raw)}
    answer = {ex.question: ex.answer for ex in raw}
    other = {ex.question: next(v for v in ATTRIBUTE_BY_NAME[ex.meta["attribute"]].values if v != ex.answer)
             for ex in raw}

    def script(question: str) -> str:
        q = question.replace(" ?", "?")
        k = kind[q]
        return [answer[q], answer[q] + " and", other[q], "the " + answer[q]][k]

    return Scripted(tok, script), kind


def test_noisy_qa_scores_of_a_scripted_model(small: Path) -> None:
    tok = AutoTokenizer.from_pretrained(small)
    model, _ = scripted_qa(tok, 8, seed=3)
    results = evaluate_noisy_qa(model, tok, noise_ratios=(0, 0.5, 0.8, 0.9), n=8, seed=3, batch_size=3)
    # Per 4 examples: EM 1, 0, 0, 1; F1 1, 2/3 ("X and" vs "X"), 0, 1; lenient 1, 1, 0, 1.
    for r, ratio in zip(results, (0, 0.5, 0.8, 0.9), strict=True):
        assert r.noise_ratio == ratio and r.n == 8
        assert r.exact_match == pytest.approx(0.5)
        assert r.f1 == pytest.approx((2 + 2 * 2 / 3 + 2) / 8)
        assert r.lenient == pytest.approx(0.75)
    # The prompts hold 1, 2, 5, 10 documents, left-padded in batches of up to 3.
    docs = [p.count("Document [") for p, _ in model.seen]
    assert docs == [1] * 8 + [2] * 8 + [5] * 8 + [10] * 8
    assert any(0 in mask for _, mask in model.seen)
    # Same seed -> the same prompts for any model; another seed -> other examples and draws.
    again, _ = scripted_qa(tok, 8, seed=3)
    evaluate_noisy_qa(again, tok, n=8, seed=3, batch_size=5)
    assert sorted(p for p, _ in again.seen) == sorted(p for p, _ in model.seen)
    other, _ = scripted_qa(tok, 8, seed=4)
    evaluate_noisy_qa(other, tok, noise_ratios=(0.9,), n=8, seed=4)
    assert not {p for p, _ in other.seen} & {p for p, _ in model.seen}


def test_all_empty_answers_warn_and_no_examples_is_refused() -> None:
    from attndenoise.data import build_tokenizer
    from attndenoise.evaluate import EmptyAnswersWarning

    tok = build_tokenizer()
    silent = Scripted(tok, lambda question: "")  # EOS first: every prediction is ""
    with pytest.warns(EmptyAnswersWarning, match=r"noisy-qa at noise 0.8: all 4 answers are empty"):
        res = evaluate_noisy_qa(silent, tok, noise_ratios=(0.8,), n=4, seed=1)
    assert [p.prediction for p in res[0].predictions] == [""] * 4 and res[0].exact_match == 0.0
    said: list[str] = []
    one = Scripted(tok, lambda question: "" if said else said.append(question) or "Varnok")  # one answer only
    with warnings.catch_warnings():
        warnings.simplefilter("error", EmptyAnswersWarning)
        res = evaluate_noisy_qa(one, tok, noise_ratios=(0.8,), n=4, seed=1, batch_size=4)
    assert sorted(p.prediction for p in res[0].predictions) == ["", "", "", "Varnok"]
    with pytest.raises(ValueError, match=r"no examples to evaluate \(n=0\)"):
        evaluate_noisy_qa(silent, tok, n=0)  # the mean over nothing would be NaN


def test_needle_grid_of_a_scripted_model(small: Path) -> None:
    tok = AutoTokenizer.from_pretrained(small)
    keys = {}

    def script(question: str) -> str:
        return keys["next"]

    model = Scripted(tok, script)
    # The scripted model answers the right key only when the haystack starts with the needle (depth 0).
    original = model.generate

    def generate(input_ids: torch.Tensor, attention_mask: torch.Tensor, **kw: Any) -> torch.Tensor:
        outs = []
        for row, mask in zip(input_ids, attention_mask, strict=True):
            text = tok.decode(row[mask.bool()].tolist())
            key = re.search(r"pass key is ((?:\d ){4}\d)", text).group(1)  # type: ignore[union-attr]
            keys["next"] = key if text.split(">", 1)[1].lstrip().startswith("The pass key") else "1 2 3 4 5"
            outs.append(original(row[None], mask[None], **kw))
        width = max(o.shape[1] for o in outs)
        return torch.cat([torch.nn.functional.pad(o, (0, width - o.shape[1]), value=0) for o in outs])

    model.generate = generate  # type: ignore[method-assign]
    cells = evaluate_needle(model, tok, context_lengths=(48, 80), depths=(0.0, 0.5, 1.0), n=2)
    assert [(c.context_len, c.depth) for c in cells] == [(48, 0.0), (48, 0.5), (48, 1.0), (80, 0.0), (80, 0.5),
                                                         (80, 1.0)]
    assert [c.exact_match for c in cells] == [1.0, 0.0, 0.0, 1.0, 0.0, 0.0]
    assert all(c.n == 2 for c in cells)


# -- generation and perplexity against plain loops ---------------------------------------------------------------


def greedy_no_cache(model: Any, ids: list[int], steps: int, stop: int) -> list[int]:
    out = list(ids)
    with torch.no_grad():
        for _ in range(steps):
            nxt = int(model(torch.tensor([out]), use_cache=False).logits[0, -1].argmax())
            if nxt == stop:
                break
            out.append(nxt)
    return out[len(ids):]


@pytest.mark.parametrize("method", [None, "daa"])
def test_batched_cached_generation_matches_a_plain_loop(small: Path, method: str | None) -> None:
    model, tok = load(small)
    if method:
        ad.apply(model, ad.config_for(method, anneal_steps=0))
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for m in ad.method_modules(model).values():
                for p in m.parameters():
                    p.add_(0.3 * torch.randn(p.shape, generator=g))
    # The 40-step model stops at once; a never-generated stop id makes it write full answers to compare.
    model.generation_config.eos_token_id = tok.convert_tokens_to_ids("<unk>")
    exs = [build_noisy_example(e, 0.5 if i % 2 else 0.8, rng=i)
           for i, e in enumerate(SyntheticQA(1, split="test").examples(5))]
    got = generate_answers(model, tok, exs, batch_size=3, max_new_tokens=6, first_line=False)
    for ex, (text, dropped) in zip(exs, got, strict=True):
        enc = encode_for_training(ex, tok)
        ref = greedy_no_cache(model, enc.input_ids[: enc.prompt_length], 6, tok.convert_tokens_to_ids("<unk>"))
        assert text == tok.decode(ref, skip_special_tokens=True).strip() and dropped == 0
        assert len(ref) == 6


def test_perplexity_matches_a_hand_sum(small: Path) -> None:
    model, tok = load(small)
    texts = held_out_texts(3, seed=2) + ["Kalo Dremet lives in Varnok."]
    res = evaluate_perplexity(model, tok, texts, batch_size=3, max_length=40)
    nll, count = 0.0, 0
    with torch.no_grad():
        for t in texts:
            ids = tok(t)["input_ids"]
            for s in range(0, len(ids), 40):  # windows of 40 tokens, each scored from its own start
                w = torch.tensor([ids[s:s + 40]])
                if w.shape[1] < 2:
                    continue
                logp = torch.log_softmax(model(w).logits[0, :-1].double(), -1)
                nll -= float(logp.gather(1, w[0, 1:, None]).sum())
                count += w.shape[1] - 1
    assert res.tokens == count and res.texts == 4
    assert res.nll == pytest.approx(nll, rel=1e-5)
    assert res.perplexity == pytest.approx(math.exp(nll / count), rel=1e-5)


# -- attention measures (docs/methods.md, section Attention measures) -------------------------------------------

# Gold keys 9-11 lie inside the 6-token sliding window of row 13 (Mistral / Gemma tiny models), noise keys 8 and 1-7.
GOLD, CONTEXT, ROWS = [(9, 12)], [(1, 5), (6, 9), (9, 12)], [13]


def stock_eager(model: Any, x: torch.Tensor, rows: list[int], gold: list[tuple[int, int]],
                context: list[tuple[int, int]]) -> tuple[list[float], list[float]]:
    """Gold / noise mass from transformers' own eager maps of the stock model (independent of attndenoise)."""
    m = copy.deepcopy(model)
    m.set_attn_implementation("eager")
    with torch.no_grad():
        maps = m(x, output_attentions=True).attentions
    g_keys = [k for s, e in gold for k in range(s, e)]
    n_keys = [k for s, e in context for k in range(s, e) if k not in g_keys]
    golds = [float(a[0][:, rows][..., g_keys].sum(-1).mean()) for a in maps]
    noises = [float(a[0][:, rows][..., n_keys].sum(-1).mean()) for a in maps]
    return golds, noises


@pytest.mark.parametrize("family", FAMILIES)
def test_attention_to_gold_of_stock_and_patched_at_init_equals_eager_stock(family: str) -> None:
    model = tiny(family)
    x = inputs(1, 16)
    ref_gold, ref_noise = stock_eager(model, x, ROWS, GOLD, CONTEXT)
    before = model.config._attn_implementation
    got, _ = measure_attention(model, x, GOLD, CONTEXT, ROWS)
    assert got.gold == pytest.approx(ref_gold, abs=1e-5) and got.noise == pytest.approx(ref_noise, abs=1e-5)
    assert model.config._attn_implementation == before  # the measure put the implementation back
    ad.apply(model, ad.config_for("daa"))
    at_init, _ = measure_attention(model, x, GOLD, CONTEXT, ROWS)
    assert at_init.gold == pytest.approx(ref_gold, abs=1e-5) and at_init.noise == pytest.approx(ref_noise, abs=1e-5)
    assert 0 < min(ref_gold) and max(g + nz for g, nz in zip(ref_gold, ref_noise, strict=True)) < 1


@pytest.mark.parametrize("method", sorted(ad.METHODS))
def test_every_method_at_init_measures_like_stock(method: str) -> None:
    model = tiny("llama")
    x = inputs(1, 24)
    ref_gold, ref_noise = stock_eager(model, x, [22, 23], GOLD, CONTEXT)
    case = next(c for c in cases(method) if c.identity is not None)  # the method's first row that starts as stock
    ad.apply(model, case.config(**case.identity))  # SRA: zero thresholds edit nothing (no parameters to start at 0)
    got, _ = measure_attention(model, x, GOLD, CONTEXT, [22, 23])
    assert got.gold == pytest.approx(ref_gold, abs=1e-5) and got.noise == pytest.approx(ref_noise, abs=1e-5)


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma2"])
def test_random_daa_attention_to_gold_is_the_signed_combined_map(family: str) -> None:
    stock = tiny(family)
    x = inputs(1, 16)
    model = copy.deepcopy(stock)
    ad.apply(model, ad.config_for("daa", anneal_steps=0, layers=[1]))  # layer 0 stays stock: same layer-1 input
    m = ad.method_modules(model)[1]
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        m.weight.add_(0.4 * torch.randn(m.weight.shape, generator=g))
        m.lam.lambda_learn.copy_(0.3 + 0.5 * torch.rand(m.lam.lambda_learn.shape, generator=g))
    got, kept = measure_attention(model, x, GOLD, CONTEXT, ROWS, keep_maps=[1])
    # DAA (docs/methods.md, section DAA): A1 = softmax(s Q K^T), A2 = softmax(s R(Q_pre W) K^T),
    # combined = A1 - lambda A2 (per head).
    c = capture(stock, x, 1)
    attn = [a for a in stock.modules() if type(a).__name__.endswith("Attention")][1]
    a1 = explicit_map(c.q, c.k, c.mask, c.scaling, c.softcap)
    a2 = explicit_map(rope(attn, c.q_pre @ m.weight.detach(), c.pos), c.k, c.mask, c.scaling, c.softcap)
    combined = a1 - m.lam.lambda_learn.detach().double().view(1, -1, 1, 1) * a2
    expect_gold = float(combined[0][:, ROWS, 9:12].sum(-1).mean())
    expect_noise = float(combined[0][:, ROWS][..., [1, 2, 3, 4, 6, 7, 8]].sum(-1).mean())
    assert got.gold[1] == pytest.approx(expect_gold, abs=1e-5)
    assert got.noise[1] == pytest.approx(expect_noise, abs=1e-5)
    assert torch.allclose(kept[1].double(), combined[0], atol=1e-5)
    ref_gold, _ = stock_eager(stock, x, ROWS, GOLD, CONTEXT)
    assert got.gold[0] == pytest.approx(ref_gold[0], abs=1e-5)  # the unpatched layer: the stock eager map
    assert abs(got.gold[1] - ref_gold[1]) > 1e-3  # the method changed the measure


def test_example_attention_uses_the_gold_span_and_answer_positions(small: Path) -> None:
    model, tok = load(small)
    ex = build_noisy_example(SyntheticQA(0, split="test").example(), 0.8, rng=0)
    enc = encode_for_training(ex, tok)
    last, _, _ = example_attention(model, tok, ex)
    answer, _, _ = example_attention(model, tok, ex, query="answer")
    rows_last = [enc.prompt_length - 1]
    rows_answer = list(range(enc.prompt_length - 1, len(enc.input_ids) - 1))
    x = torch.tensor([enc.input_ids])
    for meas, rows, ids in ((last, rows_last, x[:, : enc.prompt_length]), (answer, rows_answer, x)):
        ref_gold, ref_noise = stock_eager(model, ids, rows, enc.gold_spans, enc.document_spans)
        assert meas.gold == pytest.approx(ref_gold, abs=1e-5) and meas.noise == pytest.approx(ref_noise, abs=1e-5)
    assert len(rows_answer) == 2  # the answer word, then EOS


# -- plots --------------------------------------------------------------------------------------------------------


def fake_results(label: str, seed: int, accs: list[float]) -> EvalResults:
    qa = [QAResult(noise_ratio=r, n=10, exact_match=a, f1=a, lenient=min(1.0, a + 0.1))
          for r, a in zip((0.0, 0.5, 0.9), accs, strict=True)]
    return EvalResults(label=label, seed=seed, qa=qa)


def test_plots_write_pngs(tmp_path: Path) -> None:
    runs = [fake_results("stock", 0, [0.9, 0.6, 0.2]), fake_results("stock", 1, [0.8, 0.5, 0.3]),
            fake_results("daa", 0, [0.9, 0.7, 0.5])]
    assert accuracy_by_noise(runs)["stock"] == {0.0: [0.9, 0.8], 0.5: [0.6, 0.5], 0.9: [0.2, 0.3]}
    paths = [plot_accuracy(runs, tmp_path / "acc.png"), plot_accuracy(runs, tmp_path / "len.png", metric="lenient")]
    model = tiny("llama")
    x = inputs(1, 16)
    meas, kept = measure_attention(model, x, GOLD, CONTEXT, ROWS, keep_maps=[0])
    paths.append(plot_attention_to_gold({"stock": meas}, tmp_path / "gold.png"))
    paths.append(plot_attention_map(kept[0], GOLD, tmp_path / "map.png", query_rows=[12, 13]))
    model2, tok = load(tiny_model_path(tmp_path / "c", threads=1, **{**SMALL, "steps": 0}))
    res = EvalResults(label="init", needle=evaluate_needle(model2, tok, context_lengths=(16, 32), depths=(0, 1), n=1,
                                                           max_new_tokens=2))
    paths.append(plot_needle(res, tmp_path / "needle.png"))
    for p in paths:
        assert p.read_bytes()[:8] == PNG and p.stat().st_size > 2000


# -- results files and the command line ------------------------------------------------------------------------


def test_results_round_trip_and_csv(tmp_path: Path) -> None:
    runs = [fake_results("stock", 0, [0.9, 0.6, 0.2]), fake_results("daa", 1, [0.9, 0.7, 0.5])]
    json_path, csv_path = write_results(runs, tmp_path)
    back = read_results(tmp_path)
    assert [r.to_dict() for r in back] == [r.to_dict() for r in runs]
    rows = list(csv.DictReader(csv_path.open()))
    assert len(rows) == 2 * 3 * 3  # models x ratios x metrics
    assert {r["metric"] for r in rows} == {"exact_match", "f1", "lenient"}
    daa_len = [r for r in rows if r["label"] == "daa" and r["metric"] == "lenient" and r["noise_ratio"] == "0.9"]
    assert float(daa_len[0]["value"]) == pytest.approx(0.6) and json_path.exists()


def test_cli_eval_writes_json_and_csv(small: Path, tmp_path: Path) -> None:
    model, _ = load(small)
    ad.apply(model, ad.config_for("daa"))
    ad.save(model, tmp_path / "adapter")
    out = tmp_path / "out"
    runner = CliRunner()
    res = runner.invoke(app, ["eval", "--model", str(small), "--adapter", str(tmp_path / "adapter"), "--task",
                              "noisy-qa,ppl", "--noise", "0,0.8", "--n", "3", "--out", str(out)],
                        env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    data = json.loads((out / "results.json").read_text())
    assert data[0]["label"] == "adapter" and [q["noise_ratio"] for q in data[0]["qa"]] == [0.0, 0.8]
    assert all(q["n"] == 3 and len(q["predictions"]) == 3 for q in data[0]["qa"])
    assert [d["label"] for d in data] == ["adapter", small.name]  # the base, as the reference
    rows = [r for r in csv.DictReader((out / "results.csv").open()) if r["label"] == "adapter"]
    metrics = ("exact_match", "f1", "lenient", "best_subspan_em")
    assert [(r["task"], r["metric"]) for r in rows] == [("noisy-qa", m) for m in metrics] * 2 \
        + [("ppl", "perplexity")]
    assert float(rows[-1]["value"]) == pytest.approx(data[0]["perplexity"]["perplexity"])
    assert (out / "accuracy.png").read_bytes()[:8] == PNG
    bad = runner.invoke(app, ["eval", "--model", str(small), "--task", "nope"])
    assert bad.exit_code != 0 and "accepted" in bad.output


def wilson_by_quadratic(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson interval as the two roots p of (k/n - p)^2 = z^2 p (1 - p) / n (its definition), by the quadratic
    formula: an independent route to the same numbers as the closed form in attndenoise.robustness."""
    ph = k / n
    a, b, c = 1 + z * z / n, -(2 * ph + z * z / n), ph * ph
    root = math.sqrt(b * b - 4 * a * c)
    return (-b - root) / (2 * a), (-b + root) / (2 * a)


def test_accuracy_lines_are_what_the_plot_draws(tmp_path: Path) -> None:
    runs = [fake_results("daa", 0, [0.9, 0.7, 0.5]), fake_results("stock", 0, [0.9, 0.6, 0.2]),
            fake_results("stock", 1, [0.8, 0.5, 0.3])]
    daa, stock = accuracy_lines(runs, reference="stock")
    # One seed: the 95% Wilson interval of 9/10, 7/10, 5/10 (9/10: 0.596-0.982 in published tables).
    assert daa.label == "daa" and daa.ratios == [0.0, 0.5, 0.9] and daa.values == [0.9, 0.7, 0.5]
    assert daa.error == "wilson" and not daa.reference and daa.n == [10, 10, 10] and daa.seeds == 1
    assert (daa.lower[0], daa.upper[0]) == pytest.approx((0.5958, 0.9821), abs=1e-4)
    for k, lo, hi in zip((9, 7, 5), daa.lower, daa.upper, strict=True):
        assert (lo, hi) == pytest.approx(wilson_by_quadratic(k, 10), abs=1e-12)
    assert daa.legend == "daa, n=10"
    # Two seeds: mean +- one sample standard deviation ((0.9, 0.8): 0.85 +- sqrt(2 * 0.05^2 / 1)).
    assert stock.reference and stock.error == "std" and stock.n == [20, 20, 20] and stock.seeds == 2
    assert stock.values == pytest.approx([0.85, 0.55, 0.25])
    assert stock.upper[0] - stock.values[0] == pytest.approx(math.sqrt(2 * 0.05 ** 2))
    assert stock.legend == "stock (base), n=20, 2 seeds"
    assert plot_accuracy(runs, tmp_path / "a.png", reference="stock").read_bytes()[:8] == PNG
    with pytest.raises(ValueError, match="reference 'base' is not one of the labels"):
        plot_accuracy(runs, tmp_path / "b.png", reference="base")


def test_progress_lines_give_elapsed_and_eta() -> None:
    clock = iter([100.0, 110.0, 140.0])  # start, after the first unit, after the second
    stream = io.StringIO()
    p = Progress(4.0, "eval", stream=stream, bar=False, clock=lambda: next(clock))
    # 1 of 4 weight units in 10 s -> 30 s left; 3 of 4 in 40 s -> 40 * 1/3 = 13 s left.
    assert p.advance("noise 0", 1.0) == "eval: noise 0 done (25%); elapsed 10 s, ETA 30 s"
    assert p.advance("noise 0.9", 2.0) == "eval: noise 0.9 done (75%); elapsed 40 s, ETA 13 s"
    assert stream.getvalue().splitlines() == ["eval: noise 0 done (25%); elapsed 10 s, ETA 30 s",
                                              "eval: noise 0.9 done (75%); elapsed 40 s, ETA 13 s"]
    assert format_seconds(185) == "3 min 05 s" and format_seconds(float("nan")) == "?"
    # A resumed run: 6 of 10 units were stored (0 s each), then 2 units take 20 s: the rate is 2 units per 20 s, so
    # the 2 left take 20 s (counting the stored units in the rate would say 5 s).
    clock = iter([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 10.0, 20.0])
    r = Progress(10.0, "", stream=io.StringIO(), bar=False, clock=lambda: next(clock))
    lines = [r.advance(f"q{i}", timed=False) for i in range(6)]
    assert lines[-1] == "q5 done (60%); elapsed 0 s, ETA ?"
    r.advance("q6")
    assert r.advance("q7") == "q7 done (80%); elapsed 20 s, ETA 20 s"
    # Demo rows: 2 trained rows left at their own mean (30 s), 1 evaluated row left at its mean (5 s).
    assert eta_seconds({"eval": [4.0, 6.0], "train": [20.0, 40.0]}, {"eval": 1, "train": 2}) == 65.0
    # No trained row finished yet: the mean of every finished row (5 s) stands in.
    assert eta_seconds({"eval": [4.0, 6.0]}, {"train": 3}) == 15.0
    assert eta_seconds({}, {"train": 0}) == 0.0


def test_noisy_qa_progress_is_quiet_by_default_and_one_line_per_ratio(small: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    tok = AutoTokenizer.from_pretrained(small)
    model, _ = scripted_qa(tok, 4, seed=3)
    evaluate_noisy_qa(model, tok, noise_ratios=(0, 0.5), n=4, seed=3)
    assert capsys.readouterr().err == ""
    evaluate_noisy_qa(model, tok, noise_ratios=(0, 0.5), n=4, seed=3, progress=True)
    lines = capsys.readouterr().err.splitlines()
    # weights 60 * 4 / (1 - r): 240 and 480 -> one third, then all
    assert [re.sub(r"elapsed .*", "", x) for x in lines] == ["noisy-qa: noisy-qa noise 0 done (33%); ",
                                                            "noisy-qa: noisy-qa noise 0.5 done (100%); "]
    assert all("ETA" in x for x in lines) and lines[-1].endswith("ETA 0 s")


def test_cli_eval_compares_several_runs_with_the_base(small: Path, tmp_path: Path) -> None:
    for name, method in (("run-a", "daa"), ("run-b", "diff")):
        model, _ = load(small)
        ad.apply(model, ad.config_for(method))
        ad.save(model, tmp_path / name)
    out = tmp_path / "out"
    runner = CliRunner()
    args = ["eval", "--model", str(small), "--noise", "0,0.8", "--n", "4", "--max-new-tokens", "4"]
    res = runner.invoke(app, [*args, "--adapter", str(tmp_path / "run-a"), "--adapter", str(tmp_path / "run-b"),
                              "--out", str(out)], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    data = json.loads((out / "results.json").read_text())
    assert [d["label"] for d in data] == ["run-a", "run-b", small.name]
    assert [d["settings"]["adapter"] for d in data] == [str(tmp_path / "run-a"), str(tmp_path / "run-b"), None]
    # The same seeded examples for every model; methods at their initial values compute the stock model, so each
    # prediction equals the base's.
    for d in data[:2]:
        assert [[(p["question"], p["prediction"]) for p in q["predictions"]] for q in d["qa"]] == \
            [[(p["question"], p["prediction"]) for p in q["predictions"]] for q in data[2]["qa"]]
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert len(rows) == 3 * 2 * 4  # models x ratios x metrics
    assert [r["label"] for r in rows[::8]] == ["run-a", "run-b", small.name]
    assert (out / "accuracy.png").read_bytes()[:8] == PNG
    # progress on stderr: one line per finished setting (2 ratios x 3 models), the last one at 100%
    done = [x for x in res.output.splitlines() if x.startswith("eval: ") and "ETA" in x]
    assert len(done) == 6 and "(100%)" in done[-1]
    # a comma list, without the base
    res = runner.invoke(app, [*args, "--adapter", f"{tmp_path / 'run-a'},{tmp_path / 'run-b'}", "--no-base",
                              "--no-progress", "--out", str(tmp_path / "nb")])
    assert res.exit_code == 0, res.output
    assert [d["label"] for d in json.loads((tmp_path / "nb" / "results.json").read_text())] == ["run-a", "run-b"]
    assert "ETA" not in res.output


def test_cli_eval_labels_of_several_runs(tmp_path: Path) -> None:
    from attndenoise.cli.evaluate import model_labels

    a, b = tmp_path / "x" / "final", tmp_path / "y" / "final"
    # the same folder name twice would be averaged as seeds of one model: the whole paths tell them apart
    assert model_labels([a, b], [], None, None) == ([str(a), str(b)], "tiny")
    assert model_labels([a], [], "models/tiny", "sra") == (["final+sra"], "tiny")
    assert model_labels([], [], None, "sra") == (["tiny+sra"], "tiny")
    assert model_labels([a, b], ["tiny", "other"], None, None) == (["tiny", "other"], "base")
    runner = CliRunner()
    for extra, message in ((["--label", "one"], "1 label(s) for 2 model(s)"),
                           (["--label", "same", "--label", "same"], "--label same: given to several models")):
        for d in (a, b):
            d.mkdir(parents=True, exist_ok=True)
        res = runner.invoke(app, ["eval", "--adapter", str(a), "--adapter", str(b), *extra,
                                  "--out", str(tmp_path / "o")])
        assert res.exit_code == 2 and message in res.output, res.output
    res = runner.invoke(app, ["eval", "--no-base", "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "--no-base: nothing left to evaluate" in res.output


def test_cli_inspect_prints_measures_and_draws(small: Path, tmp_path: Path) -> None:
    ex = build_noisy_example(SyntheticQA(5, split="test").example(), 0.5, rng=1)
    record = {"documents": list(ex.documents), "gold": list(ex.gold), "question": ex.question, "answer": ex.answer}
    (tmp_path / "ex.json").write_text(json.dumps(record))
    res = CliRunner().invoke(app, ["inspect", "--model", str(small), "--example", str(tmp_path / "ex.json"),
                                   "--out", str(tmp_path / "fig.png")], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    model, tok = load(small)
    enc = encode_for_training(ex, tok)
    ids = torch.tensor([enc.input_ids[: enc.prompt_length]])
    ref_gold, _ = stock_eager(model, ids, [enc.prompt_length - 1], enc.gold_spans, enc.document_spans)
    for layer, g in enumerate(ref_gold):
        assert re.search(rf"│ {layer}\s+│ {g:.4f}", res.output), res.output
    assert (tmp_path / "fig.png").read_bytes()[:8] == PNG


# -- lm-evaluation-harness on a patched model -------------------------------------------------------------------


def test_lm_eval_harness_local_task_on_a_patched_model(small: Path, tmp_path: Path) -> None:
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    data = tmp_path / "synth.jsonl"
    with data.open("w") as f:
        for ex in SyntheticQA(0, split="test").examples(6):
            values = list(ATTRIBUTE_BY_NAME[ex.meta["attribute"]].values[:3])
            if ex.answer not in values:
                values[0] = ex.answer
            f.write(json.dumps({"context": "Document [1]: " + ex.documents[0], "question": ex.question,
                                "choices": values, "label": values.index(ex.answer)}) + "\n")
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "synth_mc.yaml").write_text(
        "task: synth_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {data}\ntest_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{context}}\\n\\nQuestion: {{question}}\\nAnswer:"\n'
        'doc_to_target: "{{label}}"\ndoc_to_choice: "{{choices}}"\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    tasks = TaskManager(include_path=str(tmp_path / "tasks"))

    def run(model: Any, tok: Any) -> tuple[float, list[float], list[tuple[str, str]]]:
        lm = HFLM(pretrained=model, tokenizer=tok, batch_size=4, device="cpu")
        out = simple_evaluate(model=lm, tasks=["synth_mc"], task_manager=tasks, log_samples=True)
        samples = sorted(out["samples"]["synth_mc"], key=lambda s: s["doc_id"])
        lls = [r[0][0] for s in samples for r in s["resps"]]
        args = [a for s in samples for a in s["arguments"]]
        return out["results"]["synth_mc"]["acc,none"], lls, [(a[0], a[1]) for a in args]

    stock, tok = load(small)
    acc_stock, ll_stock, args = run(stock, tok)
    # Independent reference: the stock model's log-likelihood of each continuation, summed by hand.
    with torch.no_grad():
        for (context, continuation), ll in zip(args, ll_stock, strict=True):
            c_ids = tok(context)["input_ids"]  # with <s>
            x_ids = tok(continuation, add_special_tokens=False)["input_ids"]
            ids = torch.tensor([c_ids + x_ids])
            logp = torch.log_softmax(stock(ids).logits[0, :-1].double(), -1)
            ref = float(logp[len(c_ids) - 1:].gather(1, ids[0, len(c_ids):, None]).sum())
            assert ll == pytest.approx(ref, abs=1e-4)
    patched, _ = load(small)
    ad.apply(patched, ad.config_for("daa"))  # identity at init
    acc_patched, ll_patched, _ = run(patched, tok)
    assert acc_patched == acc_stock and ll_patched == pytest.approx(ll_stock, abs=1e-4)
    with torch.no_grad():  # the harness really runs the method: random parameters change the scores
        for m in ad.method_modules(patched).values():
            m.lam.lambda_learn.fill_(0.5)
            m.lam.anneal_steps = 0
            m.weight.add_(0.5 * torch.randn(m.weight.shape, generator=torch.Generator().manual_seed(0)))
    _, ll_random, _ = run(patched, tok)
    assert max(abs(a - b) for a, b in zip(ll_random, ll_stock, strict=True)) > 1e-3
