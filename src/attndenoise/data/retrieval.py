"""Multi-document QA over real retrieval-style data (NaturalQuestions-Open with its Wikipedia passages).

The setting is the one of "Lost in the Middle: How Language Models Use Long Contexts" (Liu et al., TACL 2024,
arXiv:2307.03172): a question, ``k`` distractor passages and the one gold passage at a chosen position, shown as
``Document [i](Title: ...) text`` lines under a fixed instruction (``LITM_FORMAT``). The passages are 100-word
Wikipedia chunks as in DPR ("Dense Passage Retrieval for Open-Domain Question Answering", Karpukhin et al. 2020,
arXiv:2004.04906), whose ``hasanswer`` / ``isgold`` flags the records carry.

The shipped file holds only each question's gold passage, so distractors come from a ``PassagePool`` (by default
every record's gold passage): ``random`` ones, drawn uniformly, or ``hard`` ones, the BM25 top-ranked passages for
the question (``bm25s``), closer to what a retriever returns. Either way a distractor never contains an answer
string (SQuAD-normalised substring test, ``contains_answer``), so it cannot make the question answerable.

Typical use::

    records = split_records(read_multidoc_qa("nq-open-oracle.jsonl.gz"), "test")
    pool = PassagePool.from_records(read_multidoc_qa("nq-open-oracle.jsonl.gz"))
    examples = multidoc_examples(records, 9, "hard", gold_position="middle", pool=pool)
    format_prompt(examples[0], tokenizer, LITM_FORMAT)
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import shutil
import string
import unicodedata
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from ..cache import cached_build, default_cache_dir
from .examples import NoisyExample, as_rng
from .formatting import PromptFormat
from .loading import DataFormatError, iter_json_records

if TYPE_CHECKING:  # bm25s is imported only when an index is needed (it is not needed to read or split data)
    import bm25s
    import numpy as np

DistractorKind = Literal["random", "hard"]
GoldPosition = Literal["first", "middle", "last", "random"] | int
SPLITS = ("train", "validation", "test")
# 2,000 questions -> 1400 train / 200 validation / 400 test (70/10/20).
SPLIT_SIZES = (1400, 200, 400)

LITM_INSTRUCTION = (
    "Write a high-quality answer for the given question using only the provided search results "
    "(some of which might be irrelevant)."
)
# The paper's prompt: instruction, blank line, "Document [i](Title: t) text" lines, blank line, "Question: q",
# "Answer:". The document text a NoisyExample carries is already "(Title: t) text" (render_passage), hence no space
# or colon after the index; the rest are PromptFormat's defaults ("\n" between documents, "\n\n" around them).
LITM_FORMAT = PromptFormat(
    instruction=LITM_INSTRUCTION,
    document="Document [{index}]{text}",
    document_separator="\n",
    context_separator="\n\n",
    question="Question: {question}",
    answer_prefix="\nAnswer:",
)

# BM25 settings: bm25s's defaults (Lucene variant, k1=1.5, b=0.75) over its scikit-learn-style tokenizer
# (lower case, tokens of 2+ word characters) with its English stopword list and no stemmer. INDEX_FORMAT is part of
# the cache key: bump it whenever what gets indexed changes.
BM25_K1 = 1.5
BM25_B = 0.75
BM25_METHOD = "lucene"
BM25_STOPWORDS = "en"
INDEX_FORMAT = 1
INDEX_MARKER = "pool.json"


# -- records ----------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Passage:
    """A titled passage; ``isgold`` / ``hasanswer`` are the data's flags (``None`` when the file does not say)."""

    title: str
    text: str
    isgold: bool | None = None
    hasanswer: bool | None = None

    @property
    def key(self) -> tuple[str, str]:
        """Identity of a passage: title and text (the flags depend on the question, not on the passage)."""
        return (self.title, self.text)


@dataclass(frozen=True)
class MultiDocRecord:
    """One question of a multi-document QA file; ``index`` is its 0-based position among the file's records."""

    question: str
    answers: tuple[str, ...]
    ctxs: tuple[Passage, ...]
    index: int
    source: str = ""  # the file name, carried into the examples' meta
    # The record's other fields (e.g. ``nq_annotated_gold``), untouched.
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)


def render_passage(passage: Passage) -> str:
    """The passage as Lost in the Middle shows it after ``Document [i]``: ``(Title: t) text``."""
    return f"(Title: {passage.title}) {passage.text}"


def gold_indices(record: MultiDocRecord) -> tuple[int, ...]:
    """Indices of the gold passage(s) in ``record.ctxs``.

    The ctxs marked ``isgold: true`` when any is; otherwise the first ctx with ``hasanswer: true`` (a retrieved list
    without gold labels: the best-ranked passage that holds an answer is the one to read); otherwise the first ctx
    (retrieval files list the best-ranked passage first, and a record must name some gold document).
    """
    marked = tuple(i for i, c in enumerate(record.ctxs) if c.isgold)
    if marked:
        return marked
    for i, c in enumerate(record.ctxs):
        if c.hasanswer:
            return (i,)
    return (0,)


def gold_passage(record: MultiDocRecord) -> Passage:
    """The record's gold passage per ``gold_indices`` (the first one when several are marked)."""
    return record.ctxs[gold_indices(record)[0]]


def _optional_bool(value: Any, name: str, where: str) -> bool | None:
    if value is None or isinstance(value, bool):
        return value
    raise DataFormatError(f"{where}: field '{name}' must be true, false or null, got {value!r}")


def _passage(obj: Any, where: str, *, text_required: bool = True) -> Passage:
    if not isinstance(obj, Mapping):
        raise DataFormatError(f"{where}: expected an object, got {type(obj).__name__}")
    title = obj.get("title")
    title = "" if title is None else title  # a corpus without titles is still usable
    text = obj.get("text")
    if not isinstance(title, str):
        raise DataFormatError(f"{where}: field 'title' must be a string, got {type(title).__name__}")
    if text is None and text_required:
        raise DataFormatError(f"{where}: missing field 'text'")
    if not isinstance(text, str) or not text.strip():
        raise DataFormatError(f"{where}: field 'text' must be a non-empty string, got {text!r}")
    return Passage(title=title, text=text, isgold=_optional_bool(obj.get("isgold"), "isgold", where),
                   hasanswer=_optional_bool(obj.get("hasanswer"), "hasanswer", where))


def parse_multidoc_record(record: Any, where: str, index: int = 0, source: str = "") -> MultiDocRecord:
    """One ``{"question", "answers", "ctxs"}`` object -> ``MultiDocRecord``; ``where`` prefixes every error."""
    if not isinstance(record, Mapping):
        raise DataFormatError(f"{where}: expected a JSON object, got {type(record).__name__}")
    for name in ("question", "answers", "ctxs"):
        if record.get(name) is None:
            raise DataFormatError(f"{where}: missing field '{name}'")
    question = record["question"]
    if not isinstance(question, str) or not question.strip():
        raise DataFormatError(f"{where}: field 'question' must be a non-empty string, got {question!r}")
    answers_in = record["answers"]
    answers_list = [answers_in] if isinstance(answers_in, str) else answers_in
    if not isinstance(answers_list, list | tuple) or not answers_list:
        raise DataFormatError(f"{where}: field 'answers' must be a non-empty list of strings, got {answers_in!r}")
    for i, a in enumerate(answers_list):
        if not isinstance(a, str) or not a.strip():
            raise DataFormatError(f"{where}: field 'answers' item {i} must be a non-empty string, got {a!r}")
    ctxs_in = record["ctxs"]
    if not isinstance(ctxs_in, list | tuple) or not ctxs_in:
        raise DataFormatError(f"{where}: field 'ctxs' must be a non-empty list of passages, got {ctxs_in!r}")
    ctxs = tuple(_passage(c, f"{where}: field 'ctxs' item {i}") for i, c in enumerate(ctxs_in))
    extra = {k: v for k, v in record.items() if k not in ("question", "answers", "ctxs")}
    return MultiDocRecord(question=question, answers=tuple(answers_list), ctxs=ctxs, index=index, source=source,
                          extra=extra)


def read_multidoc_qa(path: str | Path) -> list[MultiDocRecord]:
    """Every record of a Lost-in-the-Middle / DPR style ``.jsonl`` or ``.jsonl.gz`` file (gzip detected by content).

    Blank lines are skipped; a malformed line raises ``DataFormatError`` naming the file and the line.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no such data file: {p}")
    return list(iter_multidoc_qa(p))


def iter_multidoc_qa(path: str | Path) -> Iterator[MultiDocRecord]:
    """``read_multidoc_qa`` one record at a time (for files too large to hold)."""
    p = Path(path)
    for i, (where, rec) in enumerate(iter_json_records(p)):
        yield parse_multidoc_record(rec, where, index=i, source=p.name)


def read_passages(path: str | Path) -> list[Passage]:
    """A passage corpus: one ``{"title": ..., "text": ...}`` object a line (``.jsonl`` or ``.jsonl.gz``)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no such passage file: {p}")
    return [_passage(rec, where) for where, rec in iter_json_records(p)]


def multidoc_record_example(record: Mapping[str, Any], where: str) -> NoisyExample:
    """A record with ``ctxs`` as a ``NoisyExample`` of its own passages (what ``load_examples`` returns for it)."""
    rec = parse_multidoc_record(record, where)
    return NoisyExample(
        question=rec.question, documents=tuple(render_passage(c) for c in rec.ctxs), gold=gold_indices(rec),
        answer=rec.answers[0], answers=rec.answers, meta=dict(rec.extra),
    )


# -- normalisation and the split --------------------------------------------------------------------------------------

_PUNCT = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def squad_normalize(text: str) -> str:
    """The SQuAD answer normalisation: lower case, punctuation removed, articles removed, whitespace collapsed.

    Exactly the official script's, as Lost in the Middle uses it; unlike ``attndenoise.evaluate.normalize_text`` it
    does not join spaced digits (that is for the word-level tokenizer of the synthetic tasks, and would make "1 2"
    match "12" here).
    """
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def _normalized_answers(answers: Iterable[str]) -> list[str]:
    # An answer that normalises to nothing (e.g. "The") would be a substring of every passage: it is ignored.
    return [n for n in (squad_normalize(a) for a in answers) if n]


def contains_answer(text: str, answers: Iterable[str]) -> bool:
    """True when some normalised answer is a substring of the normalised ``text``.

    A plain substring test (not whole words), as the paper's metric: it errs towards flagging a passage, which for
    choosing distractors is the safe side.
    """
    norm = squad_normalize(text)
    return any(a in norm for a in _normalized_answers(answers))


def _question_key(question: str) -> str:
    """sha256 of the question with Unicode (NFKC), case and whitespace normalised: a record's place in any order."""
    norm = " ".join(unicodedata.normalize("NFKC", question).casefold().split())
    return hashlib.sha256(norm.encode("utf-8")).hexdigest()


def default_split_sizes(n: int) -> tuple[int, int, int]:
    """(train, validation, test) = 70 / 10 / 20 % of ``n`` records, train taking the rounding remainder."""
    validation, test = n // 10, n // 5
    return (n - validation - test, validation, test)


def split_records(
    records: Sequence[MultiDocRecord],
    split: Literal["train", "validation", "test"],
    sizes: tuple[int, int, int] | None = None,
) -> list[MultiDocRecord]:
    """The records of one split, in a fixed order that does not depend on the file's order.

    ``sizes`` default to :func:`default_split_sizes` (70 / 10 / 20 %: 1400 / 200 / 400 for the 2,000 NQ
    questions shipped with the project). Records are sorted by the hash of their normalised question; the first
    ``sizes[0]`` are train, the next ``sizes[1]`` validation, the next ``sizes[2]`` test (records beyond the sum
    belong to no split). Identical questions would sort next to each other, in file order (NQ-Open has none).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if sizes is None:
        sizes = default_split_sizes(len(records))
    if len(sizes) != 3 or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in sizes):
        raise ValueError(f"sizes must be three non-negative integers (train, validation, test), got {sizes!r}")
    if sum(sizes) > len(records):
        raise ValueError(
            f"split sizes {tuple(sizes)} (train, validation, test) need {sum(sizes)} records, "
            f"but only {len(records)} were given; pass smaller sizes"
        )
    ordered = sorted(records, key=lambda r: _question_key(r.question))
    start = sum(sizes[: SPLITS.index(split)])
    return ordered[start: start + sizes[SPLITS.index(split)]]


# -- the distractor pool ----------------------------------------------------------------------------------------------

# Indexes already loaded in this process, by cache key: a new pool over the same passages reuses it.
_INDEX_MEMORY: dict[str, bm25s.BM25] = {}


def _indexed_text(p: Passage) -> str:
    # Title and text, as DPR's BM25 baseline indexes them: the title often names the topic the question is about.
    return f"{p.title} {p.text}"


def _build_index(texts: Sequence[str]) -> bm25s.BM25:
    """A BM25 index over ``texts`` (module-level so tests can check that a cached index is not rebuilt)."""
    import bm25s

    tokens = bm25s.tokenize(list(texts), stopwords=BM25_STOPWORDS, show_progress=False)
    retriever = bm25s.BM25(k1=BM25_K1, b=BM25_B, method=BM25_METHOD)
    retriever.index(tokens, show_progress=False)
    return retriever


class PassagePool:
    """Passages to draw distractors from, with a BM25 index built on first use and cached on disk and in memory.

    Duplicates (same title and text) are dropped, keeping the first. The on-disk index lives under
    ``cache_dir / "bm25" / <hash>`` (``cache_dir`` defaults to ``attndenoise.cache.default_cache_dir()``), the
    hash covering every passage, the BM25 settings and the ``bm25s`` version; ``use_disk_cache=False`` keeps it in
    memory only.
    """

    def __init__(
        self, passages: Iterable[Passage], *, cache_dir: str | Path | None = None, use_disk_cache: bool = True,
    ) -> None:
        seen: set[tuple[str, str]] = set()
        unique: list[Passage] = []
        for p in passages:
            if not isinstance(p, Passage):
                raise TypeError(f"a pool holds Passage objects, got {type(p).__name__}")
            if p.key not in seen:
                seen.add(p.key)
                unique.append(p)
        if not unique:
            raise ValueError("a passage pool needs at least one passage")
        self.passages: tuple[Passage, ...] = tuple(unique)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.use_disk_cache = use_disk_cache
        self._norm: list[str | None] = [None] * len(unique)  # normalised texts, filled as draws need them
        self._index: bm25s.BM25 | None = None

    @classmethod
    def from_records(cls, records: Iterable[MultiDocRecord], **kwargs: Any) -> PassagePool:
        """Every record's gold passage, sorted by (title, text) so the pool does not depend on the file's order.

        The flags are dropped: they describe a passage's relation to its own question, not to the one it distracts.
        """
        keys = sorted({gold_passage(r).key for r in records})
        return cls((Passage(title=t, text=x) for t, x in keys), **kwargs)

    @classmethod
    def from_file(cls, path: str | Path, **kwargs: Any) -> PassagePool:
        """A pool of the passages of a ``{title, text}`` JSONL corpus (``read_passages``)."""
        return cls(read_passages(path), **kwargs)

    def __len__(self) -> int:
        return len(self.passages)

    # -- filters ----------------------------------------------------------------------------------------------------

    def _normalized(self, i: int) -> str:
        norm = self._norm[i]
        if norm is None:
            # The rendered document shows the title too, so an answer in the title counts.
            norm = self._norm[i] = squad_normalize(_indexed_text(self.passages[i]))
        return norm

    def _excluder(self, record: MultiDocRecord) -> Callable[[int], bool]:
        """A test ``i -> bool``: passage ``i`` is one of the record's gold passages, or contains an answer."""
        golds = [record.ctxs[g] for g in gold_indices(record)]
        gold_keys = {g.key for g in golds}
        gold_texts = {g.text for g in golds}  # the same passage under another title is still the gold
        answers = _normalized_answers(record.answers)

        def excluded(i: int) -> bool:
            p = self.passages[i]
            if p.key in gold_keys or p.text in gold_texts:
                return True
            norm = self._normalized(i)
            return any(a in norm for a in answers)

        return excluded

    # -- random distractors -----------------------------------------------------------------------------------------

    def random_distractors(self, record: MultiDocRecord, k: int, rng: int | random.Random) -> list[Passage]:
        """``k`` distinct passages drawn uniformly from the pool, never a gold passage, never one with an answer."""
        _check_k(k)
        r = as_rng(rng)
        excluded = self._excluder(record)
        chosen: list[Passage] = []
        # Draw indices lazily without replacement (only the drawn passages are tested, not the whole pool): each
        # accepted draw is uniform over the eligible passages not drawn yet.
        n = len(self.passages)
        seen: set[int] = set()
        while len(chosen) < k and len(seen) < n:
            i = r.randrange(n)
            if i in seen:
                continue
            seen.add(i)
            if not excluded(i):
                chosen.append(self.passages[i])
        if len(chosen) < k:
            raise ValueError(f"{k} random distractors requested but the pool of {n} has only {len(chosen)} passages "
                             "that are neither gold nor contain an answer")
        return chosen

    # -- hard distractors -------------------------------------------------------------------------------------------

    def _cache_key(self) -> str:
        import bm25s

        h = hashlib.sha256()
        settings = {"format": INDEX_FORMAT, "bm25s": bm25s.__version__, "k1": BM25_K1, "b": BM25_B,
                    "method": BM25_METHOD, "stopwords": BM25_STOPWORDS}
        h.update(json.dumps(settings, sort_keys=True).encode("utf-8"))
        for p in self.passages:
            h.update(b"\n" + json.dumps([p.title, p.text], ensure_ascii=False).encode("utf-8"))
        return h.hexdigest()[:32]

    @property
    def index(self) -> bm25s.BM25:
        """The pool's BM25 index: from memory, else from the disk cache, else built (and then cached)."""
        if self._index is not None:
            return self._index
        key = self._cache_key()
        index = _INDEX_MEMORY.get(key)
        if index is None:
            index = self._load_or_build(key) if self.use_disk_cache else _build_index(
                [_indexed_text(p) for p in self.passages])
            _INDEX_MEMORY[key] = index
        self._index = index
        return index

    def _load_or_build(self, key: str) -> bm25s.BM25:
        import bm25s

        root = (self.cache_dir if self.cache_dir is not None else default_cache_dir()) / "bm25"

        def build(tmp: Path) -> None:
            _build_index([_indexed_text(p) for p in self.passages]).save(tmp, show_progress=False)
            # Written last: its presence is what marks the entry complete (cached_build renames the folder in place).
            (tmp / INDEX_MARKER).write_text(json.dumps({"num_passages": len(self.passages)}) + "\n")

        for attempt in range(2):
            entry = cached_build(root, key, INDEX_MARKER, build)
            try:
                index = bm25s.BM25.load(entry, load_corpus=False, mmap=False, show_progress=False)
                if int(index.scores["num_docs"]) != len(self.passages):
                    raise ValueError("the cached index covers a different number of passages")
                return index
            except Exception:
                # A damaged entry (e.g. files deleted by hand): remove it and build it once more.
                if attempt:
                    raise
                shutil.rmtree(entry, ignore_errors=True)
        raise AssertionError("unreachable")

    def bm25_scores(self, query: str) -> np.ndarray:
        """The BM25 score of every pool passage for ``query`` (zeros when no query word is in the index)."""
        import bm25s
        import numpy as np

        index = self.index
        words = bm25s.tokenize([query], stopwords=BM25_STOPWORDS, return_ids=False, show_progress=False)[0]
        ids = [index.vocab_dict[w] for w in words if w in index.vocab_dict]
        if not ids:
            return np.zeros(len(self.passages), dtype=np.float32)
        return np.asarray(index.get_scores_from_ids(ids))

    def ranked(self, query: str, top: int | None = None) -> list[int]:
        """Pool indices by decreasing BM25 score for ``query``, ties by pool order.

        ``top`` limits the list to the best ``top`` (plus any passage tied with the last one, so the cut never depends
        on how a partial sort breaks ties).
        """
        import numpy as np

        if top is not None and top <= 0:
            return []
        scores = self.bm25_scores(query)
        n = len(scores)
        if top is None or top >= n:
            cand = np.arange(n)
        else:
            part = np.argpartition(-scores, top - 1)[:top]
            cand = np.flatnonzero(scores >= scores[part].min())
        order = np.lexsort((cand, -scores[cand]))  # last key sorts first: score descending, then index
        return [int(i) for i in cand[order]]

    def hard_distractors(
        self, record: MultiDocRecord, k: int, rng: int | random.Random | None = None, *, margin: int = 16,
    ) -> list[Passage]:
        """The ``k`` best BM25 passages for the question that are not gold and contain no answer, best first.

        Deterministic: ``rng`` is accepted for symmetry with ``random_distractors`` and unused (ties in score go to
        the earlier passage of the pool). The top ``k + margin`` are screened first, widened fourfold while too few
        pass the filter; passages with score 0 (no word in common) rank last, in pool order.
        """
        _check_k(k)
        del rng
        if k == 0:
            return []
        excluded = self._excluder(record)
        n = len(self.passages)
        top = min(n, k + margin)
        while True:
            kept = [i for i in self.ranked(record.question, top) if not excluded(i)]
            if len(kept) >= k or top >= n:
                break
            top = min(n, top * 4)
        if len(kept) < k:
            raise ValueError(f"{k} hard distractors requested but the pool of {n} has only {len(kept)} passages "
                             "that are neither gold nor contain an answer")
        return [self.passages[i] for i in kept[:k]]

    def distractors(
        self, record: MultiDocRecord, k: int, kind: DistractorKind, rng: int | random.Random | None = None,
    ) -> list[Passage]:
        """``random_distractors`` or ``hard_distractors`` by name."""
        if kind == "random":
            if rng is None:
                raise ValueError("random distractors need a seed or a random.Random")
            return self.random_distractors(record, k, rng)
        if kind == "hard":
            return self.hard_distractors(record, k, rng)
        raise ValueError(f"distractor kind must be 'random' or 'hard', got {kind!r}")


def _check_k(k: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"the number of distractors must be an integer >= 0, got {k!r}")


# -- examples ---------------------------------------------------------------------------------------------------------

def resolve_gold_position(gold_position: GoldPosition, k: int, rng: int | random.Random | None = None) -> int:
    """The 0-based index of the gold passage among ``k + 1`` documents."""
    if isinstance(gold_position, bool):
        raise ValueError(f"gold_position must be 'first', 'middle', 'last', 'random' or an index, got {gold_position}")
    if isinstance(gold_position, int):
        if not 0 <= gold_position <= k:
            raise ValueError(f"gold_position {gold_position} out of range 0..{k} for {k} distractors")
        return gold_position
    if gold_position == "first":
        return 0
    if gold_position == "middle":
        return (k + 1) // 2  # len // 2 of the final list: the upper middle for an even count
    if gold_position == "last":
        return k
    if gold_position == "random":
        return as_rng(rng).randrange(k + 1)
    raise ValueError(f"gold_position must be 'first', 'middle', 'last', 'random' or an index, got {gold_position!r}")


def build_multidoc_example(
    record: MultiDocRecord,
    distractors: Sequence[Passage],
    gold_position: GoldPosition,
    *,
    rng: int | random.Random | None = None,
    distractor_kind: str = "given",
) -> NoisyExample:
    """The record's gold passage among ``distractors`` (kept in their order) at ``gold_position``.

    Documents are ``render_passage`` strings; ``answer`` is the first answer (the training target), ``answers`` all
    of them. ``rng`` is needed for ``gold_position="random"`` only.
    """
    gold = gold_passage(record)
    for d in distractors:
        if d.key == gold.key:
            raise ValueError("a distractor is the record's gold passage")
    pos = resolve_gold_position(gold_position, len(distractors), rng)
    passages = [*distractors[:pos], gold, *distractors[pos:]]
    meta = {"source": record.source, "index": record.index, "distractor_kind": distractor_kind,
            "gold_position": pos, "gold_placement": gold_position}
    return NoisyExample(
        question=record.question, documents=tuple(render_passage(p) for p in passages), gold=(pos,),
        answer=record.answers[0], answers=record.answers, meta=meta,
    )


def multidoc_examples(
    records: Iterable[MultiDocRecord],
    num_distractors: int,
    kind: DistractorKind,
    gold_position: GoldPosition = "random",
    seed: int = 0,
    pool: PassagePool | None = None,
    skipped: list[MultiDocRecord] | None = None,
) -> list[NoisyExample]:
    """``build_multidoc_example`` for every record, with ``num_distractors`` distractors of ``kind`` from ``pool``.

    ``pool`` defaults to the gold passages of ``records`` themselves; pass a pool built from the whole file for more
    (and more varied) distractors. Each record draws from its own generator, seeded with ``seed`` and the hash of its
    question, so its example does not depend on the other records, nor on the file's order.

    A record whose answer is in almost every passage (a one-letter answer such as "S": the answer test is a
    substring test) can have too few answer-free distractors: it raises ``ValueError``, unless a ``skipped`` list
    is given, which then receives it (training data skips it; an evaluation must not drop questions silently).
    """
    items = list(records)
    pool = pool if pool is not None else PassagePool.from_records(items)
    out = []
    for rec in items:
        rng = random.Random(f"{seed}:{_question_key(rec.question)}")
        try:
            chosen = pool.distractors(rec, num_distractors, kind, rng)
        except ValueError:
            if skipped is None:
                raise
            skipped.append(rec)
            continue
        out.append(build_multidoc_example(rec, chosen, gold_position, rng=rng, distractor_kind=kind))
    return out
