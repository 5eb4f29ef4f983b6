"""Multi-document QA data: the reader and its errors, the split, BM25 hard and random distractors, the on-disk index
cache, gold placement, the Lost-in-the-Middle prompt, and loading the format through ``load_examples``.

Expectations are written by hand (or, for BM25, computed by an independent Okapi BM25 below), never by the code under
test.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import random
import re
import string
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from attndenoise.data import (
    LITM_FORMAT,
    SPLIT_SIZES,
    DataFormatError,
    MultiDocRecord,
    NoisyExample,
    Passage,
    PassagePool,
    build_multidoc_example,
    contains_answer,
    default_split_sizes,
    format_context,
    format_prompt,
    gold_passage,
    load_examples,
    multidoc_examples,
    read_multidoc_qa,
    read_passages,
    retrieval,
    split_records,
    squad_normalize,
)

REAL_FILE = Path("/work/shared/data/nq-open-oracle.jsonl.gz")


def write_jsonl(path: Path, records: list[Any], *, gz: bool = False, raw_lines: list[str] | None = None) -> Path:
    lines = raw_lines if raw_lines is not None else [json.dumps(r) for r in records]
    data = ("\n".join(lines) + "\n").encode("utf-8")
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def ctx(title: str, text: str, **flags: Any) -> dict[str, Any]:
    return {"title": title, "text": text, **flags}


def record(question: str, answers: list[str], passages: list[Passage], index: int = 0) -> MultiDocRecord:
    return MultiDocRecord(question=question, answers=tuple(answers), ctxs=tuple(passages), index=index, source="t")


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own cache folder and an empty in-memory index cache."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("ATTNDENOISE_CACHE", str(cache))
    monkeypatch.setattr(retrieval, "_INDEX_MEMORY", {})
    return cache


# -- reader -----------------------------------------------------------------------------------------------------------

READER_RECORDS = [
    {"question": "who wrote hamlet", "answers": ["William Shakespeare", "Shakespeare"],
     "ctxs": [ctx("Hamlet", "Hamlet is a tragedy by William Shakespeare.", hasanswer=True, isgold=True)],
     "nq_annotated_gold": {"title": "Hamlet"}},
    {"question": "capital of peru", "answers": "Lima",  # a single string
     "ctxs": [ctx("Peru", "Peru is in South America."), ctx("Lima", "Lima is the capital of Peru.", hasanswer=True)]},
    {"question": "tallest mountain", "answers": ["Everest"],
     "ctxs": [ctx("K2", "K2 is the second highest."), ctx("Alps", "The Alps are in Europe.")]},
]


def test_reader_fields_answers_and_gold_rule(tmp_path: Path) -> None:
    lines = [json.dumps(READER_RECORDS[0]), "", "   ", json.dumps(READER_RECORDS[1]), json.dumps(READER_RECORDS[2])]
    recs = read_multidoc_qa(write_jsonl(tmp_path / "qa.jsonl", [], raw_lines=lines))
    assert [r.index for r in recs] == [0, 1, 2]  # blank lines skipped, not counted
    assert recs[0].question == "who wrote hamlet"
    assert recs[0].answers == ("William Shakespeare", "Shakespeare")
    assert recs[0].ctxs == (Passage("Hamlet", "Hamlet is a tragedy by William Shakespeare.", True, True),)
    assert recs[0].source == "qa.jsonl"
    assert recs[1].answers == ("Lima",)
    assert recs[1].ctxs[0] == Passage("Peru", "Peru is in South America.", None, None)  # missing flags -> None
    # No isgold anywhere: the first ctx with hasanswer; neither flag: the first ctx.
    assert gold_passage(recs[0]).title == "Hamlet"
    assert gold_passage(recs[1]).title == "Lima"
    assert gold_passage(recs[2]).title == "K2"


def test_isgold_wins_over_hasanswer() -> None:
    rec = record("q", ["a"], [Passage("x", "a here", isgold=False, hasanswer=True), Passage("y", "a too", isgold=True)])
    assert gold_passage(rec).title == "y"


def test_reader_gzip_by_suffix_and_by_content(tmp_path: Path) -> None:
    plain = read_multidoc_qa(write_jsonl(tmp_path / "qa.jsonl", READER_RECORDS))
    gz = read_multidoc_qa(write_jsonl(tmp_path / "qa.jsonl.gz", READER_RECORDS, gz=True))
    misnamed = read_multidoc_qa(write_jsonl(tmp_path / "other.jsonl", READER_RECORDS, gz=True))
    assert [(r.question, r.answers, r.ctxs) for r in gz] == [(r.question, r.answers, r.ctxs) for r in plain]
    assert [r.answers for r in misnamed] == [r.answers for r in plain]
    assert gz[0].source == "qa.jsonl.gz"


GOOD = json.dumps(READER_RECORDS[0])


@pytest.mark.parametrize(("bad_line", "message"), [
    ('{"question": "q", "answers": ["a"], ', "invalid JSON"),
    ('["not", "an", "object"]', "expected a JSON object"),
    ('{"answers": ["a"], "ctxs": [{"title": "t", "text": "x"}]}', "missing field 'question'"),
    ('{"question": "q", "ctxs": [{"title": "t", "text": "x"}]}', "missing field 'answers'"),
    ('{"question": "q", "answers": ["a"]}', "missing field 'ctxs'"),
    ('{"question": 7, "answers": ["a"], "ctxs": [{"title": "t", "text": "x"}]}', "'question' must be"),
    ('{"question": "q", "answers": [], "ctxs": [{"title": "t", "text": "x"}]}', "'answers' must be a non-empty"),
    ('{"question": "q", "answers": ["a", 3], "ctxs": [{"title": "t", "text": "x"}]}', "'answers' item 1"),
    ('{"question": "q", "answers": ["a"], "ctxs": {"title": "t"}}', "'ctxs' must be a non-empty list"),
    ('{"question": "q", "answers": ["a"], "ctxs": [{"title": "t"}]}', "'ctxs' item 0: missing field 'text'"),
    ('{"question": "q", "answers": ["a"], "ctxs": [{"title": 1, "text": "x"}]}', "'title' must be a string"),
    ('{"question": "q", "answers": ["a"], "ctxs": [{"title": "t", "text": "x", "isgold": "yes"}]}', "'isgold'"),
])
def test_reader_reports_file_and_line(tmp_path: Path, bad_line: str, message: str) -> None:
    path = write_jsonl(tmp_path / "bad.jsonl", [], raw_lines=[GOOD, "", bad_line, GOOD])
    with pytest.raises(DataFormatError, match=rf"^bad\.jsonl:3: .*{re.escape(message)}"):
        read_multidoc_qa(path)


def test_reader_reports_bad_line_inside_gzip(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "bad.jsonl.gz", [], raw_lines=[GOOD, "{oops"], gz=True)
    with pytest.raises(DataFormatError, match=r"^bad\.jsonl\.gz:2: invalid JSON"):
        read_multidoc_qa(path)
    truncated = tmp_path / "cut.jsonl.gz"
    truncated.write_bytes(gzip.compress(("\n".join([GOOD] * 50) + "\n").encode())[:-30])
    with pytest.raises(DataFormatError, match=r"^cut\.jsonl\.gz:\d+: corrupt gzip"):
        read_multidoc_qa(truncated)


def test_read_passages(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "corpus.jsonl.gz", [{"title": "A", "text": "alpha"}, {"text": "untitled"}], gz=True)
    assert read_passages(path) == [Passage("A", "alpha"), Passage("", "untitled")]
    with pytest.raises(DataFormatError, match=r"^c2\.jsonl:1: missing field 'text'"):
        read_passages(write_jsonl(tmp_path / "c2.jsonl", [{"title": "A"}]))


# -- normalisation ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "expected"), [
    ("The Beatles!", "beatles"),
    ("An  apple, a day", "apple day"),
    ("7 3 9", "7 3 9"),  # digits are not joined (unlike evaluate.normalize_text)
    ("Théâtre  des Champs-Élysées", "théâtre des champsélysées"),
    ("anthem of the USA", "anthem of usa"),
])
def test_squad_normalize(text: str, expected: str) -> None:
    assert squad_normalize(text) == expected


def test_contains_answer() -> None:
    assert contains_answer("Released on May 18, 2018, in the US.", ["may 18 2018"])
    assert contains_answer("THE NILE, a river", ["Nile"])
    assert not contains_answer("The Nile river", ["Amazon", "Congo"])
    assert not contains_answer("anything at all", ["The"])  # an answer normalising to nothing never matches


# -- split ------------------------------------------------------------------------------------------------------------

def split_file(path: Path, n: int, *, shuffle_seed: int | None = None) -> Path:
    recs = [{"question": f"question number {i}", "answers": [f"ans{i}"], "ctxs": [ctx(f"T{i}", f"text {i}")]}
            for i in range(n)]
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(recs)
    return write_jsonl(path, recs)


def test_split_sizes_disjoint_and_hash_order(tmp_path: Path) -> None:
    recs = read_multidoc_qa(split_file(tmp_path / "s.jsonl", 30))
    sizes = (10, 5, 8)
    parts = {s: split_records(recs, s, sizes) for s in ("train", "validation", "test")}  # type: ignore[arg-type]
    assert [len(parts[s]) for s in ("train", "validation", "test")] == [10, 5, 8]
    qs = {s: {r.question for r in parts[s]} for s in parts}
    assert not qs["train"] & qs["validation"] and not qs["train"] & qs["test"] and not qs["validation"] & qs["test"]
    # The documented order: sha256 of the (already normalised) question text.
    by_hash = sorted((r.question for r in recs), key=lambda q: hashlib.sha256(q.encode()).hexdigest())
    assert [r.question for r in parts["train"]] == by_hash[:10]
    assert [r.question for r in parts["validation"]] == by_hash[10:15]
    assert [r.question for r in parts["test"]] == by_hash[15:23]


def test_split_is_stable_under_file_order(tmp_path: Path) -> None:
    a = read_multidoc_qa(split_file(tmp_path / "a.jsonl", 40))
    b = read_multidoc_qa(split_file(tmp_path / "b.jsonl", 40, shuffle_seed=3))
    assert [r.question for r in a] != [r.question for r in b]
    for s in ("train", "validation", "test"):
        assert ([r.question for r in split_records(a, s, (20, 8, 12))]  # type: ignore[arg-type]
                == [r.question for r in split_records(b, s, (20, 8, 12))])  # type: ignore[arg-type]
    # Case and spacing do not move a question.
    c = [r if r.index else MultiDocRecord("  QUESTION   Number 0 ", r.answers, r.ctxs, r.index) for r in a]
    pos = [r.index for r in split_records(a, "train", (20, 8, 12))]
    assert pos == [r.index for r in split_records(c, "train", (20, 8, 12))]


def test_split_errors(tmp_path: Path) -> None:
    recs = read_multidoc_qa(split_file(tmp_path / "s.jsonl", 30))
    with pytest.raises(ValueError, match=r"\(20, 5, 8\).*33 records.*only 30"):
        split_records(recs, "test", (20, 5, 8))
    with pytest.raises(ValueError, match="split must be"):
        split_records(recs, "dev", (1, 1, 1))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="non-negative"):
        split_records(recs, "test", (1, -1, 1))
    assert len(split_records(recs, "test", (30, 0, 0))) == 0
    assert SPLIT_SIZES == (1400, 200, 400) == default_split_sizes(2000)
    assert default_split_sizes(45) == (32, 4, 9)
    assert [len(split_records(recs, s)) for s in ("train", "validation", "test")] == [21, 3, 6]  # 30 records


@pytest.mark.skipif(not REAL_FILE.exists(), reason=f"the shared NQ-Open file {REAL_FILE} is not present")
def test_split_of_the_real_file() -> None:
    recs = read_multidoc_qa(REAL_FILE)
    assert len(recs) == 2000
    parts = [split_records(recs, s) for s in ("train", "validation", "test")]  # type: ignore[arg-type]
    assert [len(p) for p in parts] == [1400, 200, 400]
    indices = [r.index for p in parts for r in p]
    assert len(set(indices)) == 2000
    assert all(len(r.answers) >= 1 and r.ctxs[0].isgold for r in recs)


# -- BM25 hard distractors --------------------------------------------------------------------------------------------

# Lucene's English stopwords (bm25s's list), written out here; test texts are tokenised independently with them.
STOP = set("a an and are as at be but by for if in into is it no not of on or such that the their then there these "
           "they this to was will with".split())


def okapi_scores(query: str, docs: list[str], k1: float = 1.5, b: float = 0.75) -> list[float]:
    """Okapi BM25 (Lucene idf ``ln(1 + (N - df + 0.5) / (df + 0.5))``), written for the test."""
    def toks(t: str) -> list[str]:
        return [w for w in re.findall(r"(?u)\b\w\w+\b", t.lower()) if w not in STOP]
    corpus = [toks(d) for d in docs]
    n, avg = len(corpus), sum(len(d) for d in corpus) / len(corpus)
    out = []
    for d in corpus:
        s = 0.0
        for q in toks(query):
            df = sum(q in c for c in corpus)
            if df == 0:
                continue
            idf = math.log(1 + (n - df + 0.5) / (df + 0.5))
            tf = d.count(q)
            s += idf * tf * (k1 + 1) / (tf + k1 * (1 - b + b * len(d) / avg))
        out.append(s)
    return out


GOLD = Passage("Nile", "The Nile is the river that flows through Cairo.")
HARD_POOL = [
    GOLD,
    Passage("Cairo Tower", "Which tower stands where the river flows through Cairo?"),          # every query word
    Passage("Nile Delta", "The delta where the NILE river reaches the sea, north of Cairo."),      # has the answer
    Passage("Amazon", "The Amazon river flows through Brazil."),                                    # river, flows
    Passage("Bread", "Bread is baked from flour and water."),                                       # nothing shared
    Passage("Kettle", "Kettles boil water quickly."),                                               # nothing shared
    Passage("Rhine", "Rhine river, flows north; the Nile-like Rhine is long."),                     # "nile like"
    Passage("Danube", "Danube river flows through Vienna and Budapest and other cities nearby."),  # longer
]
NILE = record("which river flows through cairo", ["Nile", "the Nile river"], [GOLD])


def test_hard_distractors_obvious_order(tmp_path: Path) -> None:
    pool = PassagePool(HARD_POOL, cache_dir=tmp_path)
    got = pool.hard_distractors(NILE, 3)
    assert [p.title for p in got] == ["Cairo Tower", "Amazon", "Danube"]
    # Zero-score passages rank last, in pool order.
    assert [p.title for p in pool.hard_distractors(NILE, 5)] == ["Cairo Tower", "Amazon", "Danube", "Bread", "Kettle"]
    for p in pool.hard_distractors(NILE, 5):
        assert p != GOLD and "nile" not in (p.title + " " + p.text).lower()
    with pytest.raises(ValueError, match="6 hard distractors.*only 5"):
        pool.hard_distractors(NILE, 6)


def test_bm25_matches_an_independent_okapi(tmp_path: Path) -> None:
    pool = PassagePool(HARD_POOL, cache_dir=tmp_path)
    docs = [f"{p.title} {p.text}" for p in HARD_POOL]  # title and text are indexed together
    for query in (NILE.question, "river flows north", "water bread kettles", "cairo cairo tower"):
        expected = okapi_scores(query, docs)
        got = pool.bm25_scores(query)
        # bm25s's Lucene variant leaves out the constant (k1 + 1) factor; float32 scores.
        assert [float(g) for g in got] == pytest.approx([e / 2.5 for e in expected], rel=1e-5, abs=1e-6)
        by_expected = sorted(range(len(docs)), key=lambda i: (-round(expected[i], 6), i))
        assert pool.ranked(query) == by_expected


def test_hard_distractors_widen_past_answer_passages(tmp_path: Path) -> None:
    # Twenty top-ranked passages all contain the answer; the two without it rank below them.
    answer_docs = [Passage(f"Zebra {i}", f"zebra stripes quagga {i}") for i in range(20)]
    others = [Passage("Zebra crossing", "zebra crossing road"), Passage("Horse", "horse stripes")]
    rec = record("zebra stripes", ["quagga"], [Passage("Quagga", "the quagga was a zebra")])
    pool = PassagePool([*answer_docs, *others], cache_dir=tmp_path)
    assert [p.title for p in pool.hard_distractors(rec, 2, margin=1)] == ["Zebra crossing", "Horse"]


def test_hard_ties_are_broken_by_pool_order(tmp_path: Path) -> None:
    twins = [Passage("Twin", f"mango quartz {w}") for w in ("violin", "tundra", "cello", "banjo")]
    rec = record("mango quartz", ["gold answer"], [Passage("G", "gold answer here")])
    pool = PassagePool(twins, cache_dir=tmp_path)
    assert pool.hard_distractors(rec, 4) == twins  # equal scores: pool order
    assert pool.hard_distractors(rec, 2, 1) == pool.hard_distractors(rec, 2, 99) == twins[:2]


def test_index_cache_on_disk_is_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "c"
    first = PassagePool(HARD_POOL, cache_dir=cache).hard_distractors(NILE, 3)
    entries = [p for p in (cache / "bm25").iterdir() if not p.name.startswith(".")]
    assert len(entries) == 1 and (entries[0] / "pool.json").exists()
    assert not list((cache / "bm25").glob(".*tmp-*"))  # the temporary build folder was renamed away

    def no_indexing(texts: Any) -> Any:
        raise AssertionError("the index was rebuilt instead of loaded from the cache")

    monkeypatch.setattr(retrieval, "_INDEX_MEMORY", {})
    monkeypatch.setattr(retrieval, "_build_index", no_indexing)
    assert PassagePool(HARD_POOL, cache_dir=cache).hard_distractors(NILE, 3) == first
    # The cache key covers the contents: one more passage needs a new index.
    with pytest.raises(AssertionError, match="rebuilt"):
        PassagePool([*HARD_POOL, Passage("New", "new text")], cache_dir=cache).hard_distractors(NILE, 3)
    # In memory: a second pool over the same passages reuses the loaded index even with the disk entry gone.
    for e in entries:
        for f in e.iterdir():
            f.unlink()
        e.rmdir()
    assert PassagePool(HARD_POOL, cache_dir=cache).hard_distractors(NILE, 3) == first


def test_default_cache_dir_and_memory_only(isolated_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    PassagePool(HARD_POOL).hard_distractors(NILE, 1)
    assert list((isolated_cache / "bm25").glob("*/pool.json"))
    monkeypatch.setattr(retrieval, "_INDEX_MEMORY", {})
    never = isolated_cache.parent / "never"
    pool = PassagePool(HARD_POOL, cache_dir=never, use_disk_cache=False)
    assert [p.title for p in pool.hard_distractors(NILE, 1)] == ["Cairo Tower"]
    assert not never.exists()


# -- random distractors -----------------------------------------------------------------------------------------------

def random_pool() -> tuple[MultiDocRecord, list[Passage]]:
    gold = Passage("Röntgen", "Wilhelm Conrad Röntgen won the first Nobel Prize in Physics.")
    passages = [gold] + [Passage(f"P{i}", f"filler passage number {i}") for i in range(20)]
    passages += [Passage("Leak 1", "It went to RONTGEN, Wilhelm."),  # normalises to contain "rontgen"
                 Passage("Leak 2", "Physicist wilhelm conrad röntgen."),
                 Passage("Röntgen (copy)", gold.text)]  # the gold text under another title
    rec = record("who got the first nobel prize in physics", ["Wilhelm Conrad Röntgen", "Rontgen"], [gold])
    return rec, passages


def test_random_distractors_never_gold_nor_answer() -> None:
    rec, passages = random_pool()
    pool = PassagePool(passages, use_disk_cache=False)
    eligible = {p for p in passages if p.title.startswith("P")}
    seen: Counter[str] = Counter()
    for seed in range(200):
        got = pool.random_distractors(rec, 5, seed)
        assert len(got) == 5 and len(set(got)) == 5
        assert set(got) <= eligible
        seen.update(p.title for p in got)
    assert set(seen) == {p.title for p in eligible}  # every eligible passage gets drawn
    assert max(seen.values()) < 3 * min(seen.values())  # roughly uniform (expected 50 each)
    with pytest.raises(ValueError, match="21 random distractors.*only 20"):
        pool.random_distractors(rec, 21, 0)


def test_random_distractors_are_seeded() -> None:
    rec, passages = random_pool()
    pool = PassagePool(passages, use_disk_cache=False)
    assert pool.random_distractors(rec, 6, 7) == pool.random_distractors(rec, 6, random.Random(7))
    assert len({tuple(pool.random_distractors(rec, 6, s)) for s in range(10)}) > 5
    with pytest.raises(ValueError, match="seed"):
        pool.distractors(rec, 3, "random")
    with pytest.raises(ValueError, match="kind"):
        pool.distractors(rec, 3, "dense", 0)  # type: ignore[arg-type]


# -- examples ---------------------------------------------------------------------------------------------------------

DISTRACTORS = [Passage(f"D{i}", f"distractor {i}") for i in range(1, 5)]
SIMPLE = record("what is gold", ["gold answer", "au"], [Passage("G", "the gold text", isgold=True)], index=7)


def titles(ex: NoisyExample) -> list[str]:
    return [d.split(")")[0].removeprefix("(Title: ") for d in ex.documents]


@pytest.mark.parametrize(("position", "k", "expected"), [
    ("first", 4, ["G", "D1", "D2", "D3", "D4"]),
    ("middle", 4, ["D1", "D2", "G", "D3", "D4"]),
    ("middle", 3, ["D1", "D2", "G", "D3"]),  # len // 2 of the final 4 documents
    ("middle", 0, ["G"]),
    ("last", 4, ["D1", "D2", "D3", "D4", "G"]),
    (1, 4, ["D1", "G", "D2", "D3", "D4"]),
    (0, 2, ["G", "D1", "D2"]),
])
def test_gold_positions(position: Any, k: int, expected: list[str]) -> None:
    ex = build_multidoc_example(SIMPLE, DISTRACTORS[:k], position, distractor_kind="hard")
    assert titles(ex) == expected
    assert ex.gold == (expected.index("G"),)
    assert ex.documents[ex.gold[0]] == "(Title: G) the gold text"
    assert ex.answer == "gold answer" and ex.answers == ("gold answer", "au")
    assert dict(ex.meta) == {"source": "t", "index": 7, "distractor_kind": "hard",
                             "gold_position": expected.index("G"), "gold_placement": position}


def test_random_gold_position_and_errors() -> None:
    positions = {build_multidoc_example(SIMPLE, DISTRACTORS, "random", rng=s).gold[0] for s in range(60)}
    assert positions == {0, 1, 2, 3, 4}
    assert (build_multidoc_example(SIMPLE, DISTRACTORS, "random", rng=3)
            == build_multidoc_example(SIMPLE, DISTRACTORS, "random", rng=random.Random(3)))
    with pytest.raises(ValueError, match="seed"):
        build_multidoc_example(SIMPLE, DISTRACTORS, "random")
    with pytest.raises(ValueError, match="out of range 0..4"):
        build_multidoc_example(SIMPLE, DISTRACTORS, 5)
    with pytest.raises(ValueError, match="gold_position must be"):
        build_multidoc_example(SIMPLE, DISTRACTORS, "centre")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="gold passage"):
        build_multidoc_example(SIMPLE, [Passage("G", "the gold text")], "first")


def test_litm_prompt_layout() -> None:
    ex = build_multidoc_example(SIMPLE, DISTRACTORS[:1], "last")
    expected = (
        "Write a high-quality answer for the given question using only the provided search results "
        "(some of which might be irrelevant).\n"
        "\n"
        "Document [1](Title: D1) distractor 1\n"
        "Document [2](Title: G) the gold text\n"
        "\n"
        "Question: what is gold"
    )
    text, spans = format_context(ex, LITM_FORMAT)
    assert text == expected
    assert [text[s:e] for s, e in spans] == ["(Title: D1) distractor 1", "(Title: G) the gold text"]
    prompt = format_prompt(ex, None, LITM_FORMAT)  # no tokenizer chat template: the plain layout
    assert prompt.text == expected + "\nAnswer:"
    assert prompt.completion == " gold answer"


def multi_records(n: int) -> list[MultiDocRecord]:
    topics = "apple banana cherry damson elder fig grape hazel iris juniper kiwi lime".split()
    return [record(f"what colour is {t}", [f"colour{i}"], [Passage(t.title(), f"{t} fruit has colour{i} skin")], i)
            for i, t in enumerate(topics[:n])]


@pytest.mark.parametrize("kind", ["random", "hard"])
def test_multidoc_examples_seeded_and_per_record(kind: Any) -> None:
    recs = multi_records(12)
    exs = multidoc_examples(recs, 4, kind, gold_position="random", seed=1)
    assert exs == multidoc_examples(recs, 4, kind, gold_position="random", seed=1)
    pool = PassagePool.from_records(recs)
    alone = multidoc_examples(recs[3:4], 4, kind, gold_position="random", seed=1, pool=pool)
    assert alone[0] == exs[3]  # one record's draw does not depend on the others
    reversed_exs = multidoc_examples(recs[::-1], 4, kind, gold_position="random", seed=1)
    assert reversed_exs[::-1] == exs  # nor on the order of the records
    for rec, ex in zip(recs, exs, strict=True):
        assert len(ex.documents) == 5 and ex.documents[ex.gold[0]] == f"(Title: {rec.ctxs[0].title}) {rec.ctxs[0].text}"
        assert all(rec.answers[0] not in d for i, d in enumerate(ex.documents) if i != ex.gold[0])
        assert ex.meta["distractor_kind"] == kind and ex.meta["index"] == rec.index
    if kind == "random":
        assert exs != multidoc_examples(recs, 4, kind, gold_position="random", seed=2)


@pytest.mark.skipif(not REAL_FILE.exists(), reason=f"the shared NQ-Open file {REAL_FILE} is not present")
def test_real_file_hard_distractors_hold_no_answer() -> None:
    recs = read_multidoc_qa(REAL_FILE)
    pool = PassagePool.from_records(recs)
    test = split_records(recs, "test")[:40]
    table = str.maketrans("", "", string.punctuation)

    def norm(t: str) -> str:  # the SQuAD normalisation, written again for the check
        return " ".join(re.sub(r"\b(a|an|the)\b", " ", t.lower().translate(table)).split())

    for ex, rec in zip(multidoc_examples(test, 5, "hard", gold_position="middle", pool=pool), test, strict=True):
        assert ex.gold == (3,)
        for i, doc in enumerate(ex.documents):
            if i != 3:
                assert not any(norm(a) and norm(a) in norm(doc) for a in rec.answers), (rec.question, doc)


# -- load_examples ----------------------------------------------------------------------------------------------------

def test_load_examples_reads_multidoc_gzip(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "nq.jsonl.gz", READER_RECORDS, gz=True)
    exs = [e for e in load_examples(path) if isinstance(e, NoisyExample)]
    assert len(exs) == 3
    e0, e1, e2 = exs
    assert e0.documents == ("(Title: Hamlet) Hamlet is a tragedy by William Shakespeare.",)
    assert (e0.gold, e0.answer, e0.answers) == ((0,), "William Shakespeare", ("William Shakespeare", "Shakespeare"))
    assert e0.meta["nq_annotated_gold"] == {"title": "Hamlet"}
    assert (e1.gold, e1.answers) == ((1,), ("Lima",))
    assert e1.documents[1] == "(Title: Lima) Lima is the capital of Peru."
    assert e2.gold == (0,)
    with pytest.raises(DataFormatError, match=r"^nq2\.jsonl\.gz:1: .*'answers' item 0"):
        load_examples(write_jsonl(tmp_path / "nq2.jsonl.gz", [{"question": "q", "answers": [""],
                                                               "ctxs": [ctx("t", "x")]}], gz=True))


def test_load_examples_gzip_keeps_the_documents_format(tmp_path: Path) -> None:
    rec = {"documents": ["a doc", "b doc"], "gold": 1, "question": "q?", "answer": "b"}
    (ex,) = load_examples(write_jsonl(tmp_path / "d.jsonl.gz", [rec], gz=True))
    assert isinstance(ex, NoisyExample) and ex.documents == ("a doc", "b doc") and ex.gold == (1,)
