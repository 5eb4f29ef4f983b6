"""Noisy-context data: ratios, gold placement, loading and its errors, formatting, labels, gold spans, over-length."""

from __future__ import annotations

import json
import random
import warnings
from collections import Counter
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from attndenoise.data import (
    ATTRIBUTES,
    IGNORE_INDEX,
    ChatExample,
    DataFormatError,
    ExampleTooLongError,
    NoisyExample,
    SyntheticQA,
    build_noisy_example,
    build_tokenizer,
    collate,
    count_tokens,
    encode_examples,
    encode_for_training,
    examples_from_records,
    format_prompt,
    load_examples,
    noisy_examples,
    normalize_answer,
    num_distractors,
)

# A chat template that only uses words of the embedded vocabulary, written for these tests.
CHAT_TEMPLATE = (
    "{% for m in messages %}<s> {{ m['role'] }} : {{ m['content'] }} </s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s> assistant :{% endif %}"
)


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    return build_tokenizer()


@pytest.fixture
def chat_tok() -> PreTrainedTokenizerFast:
    t = build_tokenizer()
    t.chat_template = CHAT_TEMPLATE
    return t


@pytest.fixture(scope="module")
def bpe_tok() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on synthetic text: subword tokens whose boundaries differ from words."""
    tk = Tokenizer(models.BPE(unk_token=None))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    qa = SyntheticQA(7)
    texts = [d for ex in qa.examples(60) for d in ex.documents] + ["Document Question Answer [1]: ?"]
    tk.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, special_tokens=["<|eos|>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|eos|>", pad_token="<|eos|>")


def example(n_docs: int = 10, gold: int | tuple[int, ...] = 0) -> NoisyExample:
    docs = tuple(f"Kalo Orlan{i} lives in Dovra." for i in range(n_docs))
    return NoisyExample(question="Where does Kalo Orlan live?", documents=docs, gold=gold, answer="Dovra")


# -- noise ratio and gold placement -----------------------------------------------------------------------------------

@pytest.mark.parametrize(("r", "k"), [(0, 0), (0.0, 0), (0.5, 1), (0.6, 2), (0.75, 3), (0.8, 4), (0.9, 9), (0.95, 19)])
def test_num_distractors(r: float, k: int) -> None:
    assert num_distractors(r) == k


def test_num_distractors_several_gold_keeps_the_ratio() -> None:
    assert num_distractors(0.5, num_gold=2) == 2
    assert num_distractors(0.8, num_gold=2) == 8


@pytest.mark.parametrize("bad", [1.0, -0.1, 1.5, True, "0.5"])
def test_num_distractors_rejects(bad: object) -> None:
    with pytest.raises(ValueError, match="noise ratio"):
        num_distractors(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("r", [0.0, 0.5, 0.8, 0.9])
def test_build_noisy_example_counts_and_gold(r: float) -> None:
    ex = example(12, gold=3)
    noisy = build_noisy_example(ex, r, rng=1)
    assert len(noisy.documents) == num_distractors(r) + 1
    assert len(noisy.gold) == 1 and noisy.documents[noisy.gold[0]] == ex.documents[3]
    assert set(noisy.distractors) <= set(ex.distractors)
    assert len(set(noisy.documents)) == len(noisy.documents)  # drawn without replacement
    assert (noisy.question, noisy.answer) == (ex.question, ex.answer)
    assert noisy.noise_ratio == pytest.approx(num_distractors(r) / (num_distractors(r) + 1))


def test_build_noisy_example_is_seeded() -> None:
    ex = example(12)
    assert build_noisy_example(ex, 0.8, rng=5) == build_noisy_example(ex, 0.8, rng=5)
    assert build_noisy_example(ex, 0.8, rng=5) == build_noisy_example(ex, 0.8, rng=random.Random(5))
    assert len({build_noisy_example(ex, 0.8, rng=s) for s in range(20)}) > 10
    with pytest.raises(ValueError, match="seed"):
        build_noisy_example(ex, 0.8, rng=None)  # type: ignore[arg-type]


def test_gold_position_is_uniform() -> None:
    ex = example(12)
    n = 2000
    counts = Counter(build_noisy_example(ex, 0.8, rng=s).gold[0] for s in range(n))
    assert set(counts) == set(range(5))
    # Chi-square with 4 degrees of freedom; 18.5 is the 0.999 quantile.
    chi2 = sum((c - n / 5) ** 2 / (n / 5) for c in counts.values())
    assert chi2 < 18.5, counts


def test_distractor_pool_fills_in_and_skips_gold() -> None:
    ex = NoisyExample(question="q?", documents=("gold doc",), gold=0, answer="a")
    pool = ["gold doc", "other 1", "other 2", "other 3", "other 4"]
    noisy = build_noisy_example(ex, 0.8, rng=0, distractor_pool=pool)
    assert sorted(noisy.distractors) == ["other 1", "other 2", "other 3", "other 4"]
    with pytest.raises(ValueError, match="needs 9 distractors but only 4"):
        build_noisy_example(ex, 0.9, rng=0, distractor_pool=pool)
    own_first = build_noisy_example(example(3), 0.8, rng=0, distractor_pool=["x 1", "x 2", "x 3"])
    assert sum(d.startswith("x ") for d in own_first.documents) == 2  # own 2 distractors used before the pool


def test_several_gold_documents_keep_order() -> None:
    ex = example(12, gold=(2, 5))
    noisy = build_noisy_example(ex, 0.5, rng=3)
    assert len(noisy.documents) == 4
    assert [noisy.documents[g] for g in noisy.gold] == [ex.documents[2], ex.documents[5]]


def test_noisy_examples_uses_other_examples_as_pool() -> None:
    exs = [NoisyExample(question=f"q{i}?", documents=(f"doc {i}",), gold=0, answer=f"a{i}") for i in range(12)]
    noisy = noisy_examples(exs, 0.9, seed=0)
    assert noisy == noisy_examples(exs, 0.9, seed=0)
    for i, ex in enumerate(noisy):
        assert len(ex.documents) == 10 and ex.documents[ex.gold[0]] == f"doc {i}"
        assert ex.documents.count(f"doc {i}") == 1


def test_example_validation() -> None:
    with pytest.raises(ValueError, match="out of range"):
        NoisyExample(question="q", documents=("a",), gold=1, answer="x")
    with pytest.raises(ValueError, match="repeat"):
        NoisyExample(question="q", documents=("a", "b"), gold=(1, 1), answer="x")
    with pytest.raises(ValueError, match="last message"):
        ChatExample(messages=({"role": "user", "content": "hi"}, {"role": "user", "content": "x"}))


# -- loading ----------------------------------------------------------------------------------------------------------

def write_lines(path: Path, lines: list[object]) -> Path:
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


DOC_RECORD = {"documents": ["A lives in X.", "B lives in Y."], "gold": 1, "question": "Where does B live?",
              "answer": "Y", "id": "r1"}
CHAT_RECORD = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Ctx. Q?"},
                            {"role": "assistant", "content": "A"}], "gold": "Ctx."}


def test_load_jsonl_both_shapes(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "train.jsonl", [DOC_RECORD, "", {**DOC_RECORD, "gold": [0, 1]}, CHAT_RECORD])
    exs = load_examples(path)
    assert len(exs) == 3
    assert isinstance(exs[0], NoisyExample) and exs[0].gold == (1,) and exs[0].meta == {"id": "r1"}
    assert exs[0].gold_documents == ("B lives in Y.",)
    assert isinstance(exs[1], NoisyExample) and exs[1].gold == (0, 1)
    assert isinstance(exs[2], ChatExample) and exs[2].answer == "A" and exs[2].gold == "Ctx."


@pytest.mark.parametrize(("line", "message"), [
    ('{"documents": ["a"], "gold": 0, "answer": "x"}', "train.jsonl:3: missing field 'question'"),
    ('{"documents": ["a"], "gold": 0, "question": "q?"', "train.jsonl:3: invalid JSON"),
    ('{"documents": ["a"], "gold": 4, "question": "q?", "answer": "x"}', "train.jsonl:3: gold index 4 out of range"),
    ('{"documents": "a", "gold": 0, "question": "q?", "answer": "x"}', "train.jsonl:3: field 'documents' must be"),
    ('{"documents": ["a"], "gold": "first", "question": "q?", "answer": "x"}', "train.jsonl:3: field 'gold'"),
    ('[1, 2]', "train.jsonl:3: expected a JSON object"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "train.jsonl:3: messages must hold"),
    ('{"messages": [{"role": "user"}, {"role": "assistant", "content": "a"}]}', "train.jsonl:3: .*'content'"),
    ('{"messages": [{"role": "bot", "content": "x"}, {"role": "assistant", "content": "a"}]}', "train.jsonl:3: .*role"),
])
def test_malformed_line_names_file_and_line(tmp_path: Path, line: str, message: str) -> None:
    path = write_lines(tmp_path / "train.jsonl", [DOC_RECORD, "", line, DOC_RECORD])
    with pytest.raises(DataFormatError, match=message):
        load_examples(path)


def test_unsupported_and_missing_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_examples(tmp_path / "nope.jsonl")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(DataFormatError, match="unsupported file type '.txt'"):
        load_examples(tmp_path / "x.txt")


def test_load_json_array(tmp_path: Path) -> None:
    (tmp_path / "d.json").write_text(json.dumps([DOC_RECORD, {"documents": ["a"], "gold": 0}]))
    with pytest.raises(DataFormatError, match=r"d.json:record 2: missing field 'question'"):
        load_examples(tmp_path / "d.json")


def test_load_through_datasets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    rows = [DOC_RECORD, {**DOC_RECORD, "gold": 0, "answer": "X"}]
    ds = datasets.Dataset.from_list(rows)
    ds.to_parquet(str(tmp_path / "d.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    csv = tmp_path / "d.csv"
    csv.write_text('documents,gold,question,answer\n"[""A lives in X."", ""B lives in Y.""]",1,Where does B live?,Y\n'
                   '"[""A lives in X.""]",2,Where?,X\n')
    for path in (tmp_path / "d.parquet", tmp_path / "saved"):
        exs = load_examples(path)
        assert [e.gold for e in exs] == [(1,), (0,)]  # type: ignore[union-attr]
        assert exs[0].documents == tuple(DOC_RECORD["documents"])  # type: ignore[union-attr,arg-type]
    with pytest.raises(DataFormatError, match=r"d.csv:row 2: gold index 2 out of range"):
        load_examples(csv)
    assert examples_from_records([CHAT_RECORD])[0] == ChatExample(messages=CHAT_RECORD["messages"], gold="Ctx.")


# -- the synthetic tasks ----------------------------------------------------------------------------------------------

def test_synthetic_qa_is_seeded_and_split() -> None:
    a, b = SyntheticQA(3).examples(5), SyntheticQA(3).examples(5)
    assert a == b
    assert SyntheticQA(3, split="test").examples(5) != a
    assert SyntheticQA(4).examples(5) != a


def test_synthetic_distractors_are_similar_and_do_not_answer() -> None:
    shared = total = 0
    for ex in SyntheticQA(0).examples(50):
        assert ex.gold == (0,) and len(ex.documents) == 10
        name = ex.meta["entity"]
        assert f" {name} " in ex.question
        first, last = name.split()
        attr = ex.meta["attribute"]
        clause = next(a.clause for a in ATTRIBUTES if a.name == attr).format(v=ex.answer)
        assert ex.documents[0].startswith(name + " ") and clause in ex.documents[0]
        for d in ex.documents[1:]:
            assert not d.startswith(name + " ")
            assert clause not in d  # no distractor answers the question
            assert next(a.clause for a in ATTRIBUTES if a.name == attr).split("{v}")[0] in d  # same attribute type
            shared += d.split()[0] == first or d.split()[1] == last
            total += 1
    assert shared / total > 0.6


def test_synthetic_document_styles() -> None:
    for ex in SyntheticQA(5, document_style="facts").examples(20):
        for doc in ex.documents:
            name, facts = ex.meta["facts"][doc]
            sentences = [s.strip() for s in doc.split(".") if s.strip()]
            # One sentence per stated fact, each starting with the full name and stating that fact's value.
            assert len(sentences) == len(facts) == 3
            assert all(s.startswith(name + " ") for s in sentences)
            stated = {a.name: s for a in ATTRIBUTES for s in sentences if a.clause.split("{v}")[0] in s}
            assert {k: stated[k].endswith(" " + v) for k, v in facts.items()} == dict.fromkeys(facts, True)
    ex = SyntheticQA(5, document_style="sentence").example()
    assert all(doc.count(".") == 1 and doc.count(ex.meta["facts"][doc][0]) == 1 for doc in ex.documents)
    with pytest.raises(ValueError, match="facts, sentence|sentence, facts"):
        SyntheticQA(0, document_style="prose")


def test_synthetic_text_has_no_unknown_tokens(tok: PreTrainedTokenizerFast) -> None:
    qa = SyntheticQA(1)
    texts = [format_prompt(build_noisy_example(e, 0.9, rng=0), tok).text for e in qa.examples(30)]
    texts += [format_prompt(SyntheticQA.needle(200, 0.5, seed=s), tok).text for s in range(5)]
    for text in texts:
        assert tok.unk_token_id not in tok(text)["input_ids"]
        # Words and punctuation round-trip through decode (only digit runs come back spaced).
    doc = qa.example().documents[0]
    assert tok.decode(tok(doc)["input_ids"], skip_special_tokens=True) == doc


@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 1.0])
def test_needle_depth_and_length(depth: float) -> None:
    ex = SyntheticQA.needle(200, depth, seed=1)
    assert ex == SyntheticQA.needle(200, depth, seed=1)
    assert ex.layout == "plain" and ex.meta["task"] == "passkey"
    needle = ex.documents[ex.gold[0]]
    assert ex.answer.isdigit() and len(ex.answer) == 5 and needle.count(ex.answer) == 2
    total = sum(count_tokens(d) for d in ex.documents)
    assert abs(total - 200) <= 4  # rounded to whole filler sentences (at most 6 tokens each)
    before = sum(count_tokens(d) for d in ex.documents[: ex.gold[0]])
    filler = total - count_tokens(needle)
    assert abs(before - depth * filler) <= 4
    if depth == 0.0:
        assert ex.gold == (0,)
    if depth == 1.0:
        assert ex.gold == (len(ex.documents) - 1,)


# -- formatting, labels and spans -------------------------------------------------------------------------------------

def test_default_format(tok: PreTrainedTokenizerFast) -> None:
    ex = NoisyExample(question="Where does Kalo Orlan live?", documents=("Kalo Orlan lives in Dovra.", "Alvo Orlan."),
                      gold=0, answer="Dovra")
    p = format_prompt(ex, tok)
    assert p.text == ("Document [1]: Kalo Orlan lives in Dovra.\nDocument [2]: Alvo Orlan.\n\n"
                      "Question: Where does Kalo Orlan live?\nAnswer:")
    assert p.completion == " Dovra" and p.append_eos and p.add_special_tokens and not p.uses_chat_template
    assert [p.text[s:e] for s, e in p.document_spans] == list(ex.documents)
    plain = format_prompt(NoisyExample(question="q?", documents=("A b.", "C d."), gold=1, answer="x",
                                       layout="plain"), tok)
    assert plain.text == "A b. C d.\n\nQuestion: q?\nAnswer:"
    assert [plain.text[s:e] for s, e in plain.gold_spans] == ["C d."]


def test_chat_template_format(chat_tok: PreTrainedTokenizerFast) -> None:
    ex = build_noisy_example(SyntheticQA(2).example(), 0.5, rng=0)
    p = format_prompt(ex, chat_tok)
    assert p.uses_chat_template and not p.add_special_tokens and not p.append_eos
    assert p.text.startswith("<s> user : Document [1]: ") and p.text.endswith("</s>\n<s> assistant :")
    assert p.completion == f"<s> assistant : {ex.answer} </s>\n"[len("<s> assistant :"):]
    assert [p.text[s:e] for s, e in p.gold_spans] == [ex.documents[ex.gold[0]]]
    enc = encode_for_training(ex, chat_tok)
    assert enc.input_ids[0] == chat_tok.bos_token_id and enc.input_ids[1] != chat_tok.bos_token_id  # one BOS
    answer_tokens = [t for t in enc.labels if t != IGNORE_INDEX]
    assert chat_tok.convert_ids_to_tokens(answer_tokens) == [ex.answer, "</s>"]


def test_chat_example_with_and_without_template(tok: PreTrainedTokenizerFast,
                                                chat_tok: PreTrainedTokenizerFast) -> None:
    ex = ChatExample(messages=({"role": "user", "content": "The sky is blue. What is the pass key?"},
                               {"role": "assistant", "content": "blue"}), gold="The sky is blue.")
    plain = format_prompt(ex, tok)
    assert plain.text == "User: The sky is blue. What is the pass key?\nAssistant:" and plain.completion == " blue"
    for t in (tok, chat_tok):
        enc = encode_for_training(ex, t)
        assert t.decode(enc.input_ids[slice(*enc.gold_span)]) == "The sky is blue."
        assert t.decode([x for x in enc.labels if x != IGNORE_INDEX]) == "blue </s>"


def test_labels_cover_exactly_the_answer(tok: PreTrainedTokenizerFast) -> None:
    ex = build_noisy_example(SyntheticQA(5).example(), 0.8, rng=2)
    enc = encode_for_training(ex, tok)
    expected = tok(ex.answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    labelled = [i for i, t in enumerate(enc.labels) if t != IGNORE_INDEX]
    assert labelled == list(range(len(enc) - len(expected), len(enc)))
    assert enc.prompt_length == len(enc) - len(expected)
    assert [enc.labels[i] for i in labelled] == expected == enc.input_ids[enc.prompt_length:]
    assert enc.attention_mask == [1] * len(enc)
    # The prompt part is what generation sees: the prompt text tokenized alone.
    assert enc.input_ids[: enc.prompt_length] == tok(format_prompt(ex, tok).text)["input_ids"]
    needle = encode_for_training(SyntheticQA.needle(50, 0.5, seed=3), tok)
    assert tok.decode(needle.input_ids[needle.prompt_length:], skip_special_tokens=True).replace(" ", "") == \
        SyntheticQA.needle(50, 0.5, seed=3).answer


def test_gold_span_points_at_the_gold_document(tok: PreTrainedTokenizerFast,
                                               bpe_tok: PreTrainedTokenizerFast) -> None:
    for seed, ex in enumerate(SyntheticQA(9).examples(10)):
        noisy = build_noisy_example(ex, 0.9, rng=seed)
        gold = noisy.documents[noisy.gold[0]]
        for t in (tok, bpe_tok):
            enc = encode_for_training(noisy, t)
            s, e = enc.gold_span
            assert t.decode(enc.input_ids[s:e]).strip() == gold
            assert enc.gold_spans == [enc.document_spans[noisy.gold[0]]]
            assert [t.decode(enc.input_ids[a:b]).strip() for a, b in enc.document_spans] == list(noisy.documents)
            assert all(b1 <= a2 for (_, b1), (a2, _) in zip(enc.document_spans, enc.document_spans[1:], strict=False))


def test_several_gold_spans(tok: PreTrainedTokenizerFast) -> None:
    enc = encode_for_training(example(4, gold=(1, 3)), tok)
    assert len(enc.gold_spans) == 2
    with pytest.raises(ValueError, match="2 gold spans"):
        _ = enc.gold_span


# -- over-length policy -----------------------------------------------------------------------------------------------

def test_over_length_drops_farthest_distractors_first(tok: PreTrainedTokenizerFast) -> None:
    ex = NoisyExample(question="Where does Kalo Orlan live?", answer="Dovra", gold=2,
                      documents=tuple(f"Kalo Orlan{i} lives in Dovra." for i in range(7)))
    assert encode_for_training(ex, tok, max_length=10_000).dropped_distractors == 0
    # By distance from the gold (index 2): 6, 5, then 4 and 0 (distance 2, the later first), then 3 and 1.
    order = [6, 5, 4, 0, 3, 1]
    previous = len(encode_for_training(ex, tok))
    for n in range(1, len(order) + 1):
        kept = tuple(d for i, d in enumerate(ex.documents) if i not in order[:n])
        expected = NoisyExample(ex.question, kept, kept.index(ex.documents[2]), ex.answer)
        limit = len(encode_for_training(expected, tok))
        assert limit < previous  # so n drops are the fewest that fit
        enc = encode_for_training(ex, tok, max_length=limit)
        assert enc.dropped_distractors == n and len(enc) == limit
        assert enc.example == expected  # whole documents, gold kept, gold index renumbered
        assert enc.gold_span == encode_for_training(expected, tok).gold_span
        previous = limit


def test_over_length_gold_alone_too_long(tok: PreTrainedTokenizerFast) -> None:
    ex = example(5, gold=0)
    gold_only = len(encode_for_training(NoisyExample(ex.question, ex.documents[:1], 0, ex.answer), tok))
    assert encode_for_training(ex, tok, max_length=gold_only).dropped_distractors == 4
    with pytest.raises(ExampleTooLongError, match="alone take"):
        encode_for_training(ex, tok, max_length=gold_only - 1)
    with pytest.raises(ExampleTooLongError, match="overflow='error'"):
        encode_for_training(ex, tok, max_length=gold_only, overflow="error")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        short = NoisyExample("q?", ("a b.",), 0, "x")
        report = encode_examples([ex, short, ex], tok, max_length=gold_only - 1, on_too_long="skip")
    assert report.skipped == [0, 2] and len(report.encoded) == 1
    assert any("skipped 2 of 3" in str(w.message) for w in caught)
    with pytest.raises(ExampleTooLongError, match="example 0"):
        encode_examples([ex], tok, max_length=gold_only - 1)


# -- tokenizer --------------------------------------------------------------------------------------------------------

def test_tokenizer_round_trip(tok: PreTrainedTokenizerFast, tmp_path: Path) -> None:
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    texts = [format_prompt(build_noisy_example(e, 0.5, rng=0), tok).text for e in SyntheticQA(4).examples(5)]
    texts.append("an unknown word 123.")
    for text in texts:
        assert loaded(text)["input_ids"] == tok(text)["input_ids"]
    assert (loaded.bos_token_id, loaded.eos_token_id, loaded.pad_token_id, loaded.unk_token_id) == (2, 3, 0, 1)
    assert len(loaded) == len(tok) and loaded.chat_template is None
    assert loaded(["zz qq"])["input_ids"] == [[2, 1, 1]]  # BOS, then unknown words
    ids = loaded("Where does Kalo Orlan live?")["input_ids"]
    assert loaded.decode(ids, skip_special_tokens=True) == "Where does Kalo Orlan live?"


def test_normalize_answer_is_a_deprecated_name_of_the_one_normaliser() -> None:
    from attndenoise.evaluate import normalize_text

    with pytest.warns(DeprecationWarning, match="use attndenoise.evaluate.normalize_text"):
        assert normalize_answer("7 3 9 1 4") == normalize_answer("73914.") == "73914"
    with pytest.warns(DeprecationWarning):
        assert normalize_answer("  Dovra ") == normalize_text("  Dovra ") == "dovra"


def test_collate_pads(tok: PreTrainedTokenizerFast) -> None:
    a = encode_for_training(example(1), tok)
    b = encode_for_training(example(3), tok)
    out = collate([a, b], tok.pad_token_id)
    assert out["input_ids"].shape == (2, len(b))
    assert out["input_ids"][0, len(a):].eq(tok.pad_token_id).all() and out["labels"][0, len(a):].eq(-100).all()
    assert out["attention_mask"].sum(1).tolist() == [len(a), len(b)]
    left = collate([a, b], tok.pad_token_id, padding_side="left", pad_to_multiple_of=8)
    assert left["input_ids"].shape[1] % 8 == 0
    assert left["input_ids"][0, -len(a):].tolist() == a.input_ids


class _NoOffsets:
    """A tokenizer without offset mapping (as a slow, Python tokenizer): spans come from prefix lengths."""

    is_fast = False
    chat_template = None

    def __init__(self, inner: PreTrainedTokenizerFast) -> None:
        self.inner = inner
        self.eos_token_id = inner.eos_token_id

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": self.inner(text, add_special_tokens=add_special_tokens)["input_ids"]}


def test_spans_without_offsets(tok: PreTrainedTokenizerFast) -> None:
    ex = build_noisy_example(SyntheticQA(3).example(), 0.8, rng=0)
    fast, slow = encode_for_training(ex, tok), encode_for_training(ex, _NoOffsets(tok))
    assert slow.input_ids == fast.input_ids and slow.labels == fast.labels
    assert slow.document_spans == fast.document_spans and slow.gold_spans == fast.gold_spans
