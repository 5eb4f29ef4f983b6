"""Noisy-context examples: a question, its gold document(s), distractors, and the answer.

The noise ratio ``r`` of a context is the share of its documents that are distractors (the setting of the OpAmp paper's
noisy-context benchmarks): with one gold document and ``k`` distractors, ``r = k / (k + 1)``, so a ratio gives
``k = round(1 / (1 - r)) - 1`` distractors (``r = 0 -> 0``, ``0.5 -> 1``, ``0.8 -> 4``, ``0.9 -> 9``).
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

Layout = Literal["documents", "plain"]
ROLES = ("system", "user", "assistant", "tool")


@dataclass(frozen=True)
class NoisyExample:
    """A question over a list of documents, some of which (``gold``) hold the answer.

    ``layout`` says how the documents are shown to the model: ``"documents"`` numbers them
    (``Document [1]: ...``), ``"plain"`` runs them together as one text (a passkey haystack, where each "document" is a
    sentence and the gold one is the needle). Lists are stored as tuples so an example is immutable and hashable.
    """

    question: str
    documents: tuple[str, ...]
    gold: tuple[int, ...]
    answer: str
    layout: Layout = "documents"
    meta: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)
    # Every answer that counts as correct (NaturalQuestions lists several); ``answer`` is the one a model is trained
    # to write. Empty at construction means ``(answer,)``; otherwise ``answer`` is put first if it is not listed.
    answers: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # Accept lists (and a single gold index) at construction; store tuples.
        answers = tuple(self.answers)
        for a in answers:
            if not isinstance(a, str) or not a.strip():
                raise ValueError(f"every answer must be a non-empty string, got {a!r}")
        if self.answer not in answers:
            answers = (self.answer, *answers)
        object.__setattr__(self, "answers", answers)
        documents = tuple(self.documents)
        gold_in: Any = self.gold
        gold = (gold_in,) if isinstance(gold_in, int) else tuple(gold_in)
        object.__setattr__(self, "documents", documents)
        object.__setattr__(self, "gold", gold)
        if not isinstance(self.question, str) or not self.question.strip():
            raise ValueError("question must be a non-empty string")
        if not isinstance(self.answer, str) or not self.answer.strip():
            raise ValueError("answer must be a non-empty string")
        if not documents:
            raise ValueError("documents must be a non-empty list of strings")
        for i, doc in enumerate(documents):
            if not isinstance(doc, str) or not doc.strip():
                raise ValueError(f"document {i} must be a non-empty string, got {doc!r}")
        if not gold:
            raise ValueError("gold must name at least one document index")
        for g in gold:
            if isinstance(g, bool) or not isinstance(g, int) or not 0 <= g < len(documents):
                raise ValueError(f"gold index {g!r} out of range for {len(documents)} documents (0-based)")
        if len(set(gold)) != len(gold):
            raise ValueError(f"gold indices repeat: {list(gold)}")
        if self.layout not in ("documents", "plain"):
            raise ValueError(f"layout must be 'documents' or 'plain', got {self.layout!r}")

    @property
    def gold_documents(self) -> tuple[str, ...]:
        """The gold documents, in context order."""
        return tuple(self.documents[g] for g in sorted(self.gold))

    @property
    def distractors(self) -> tuple[str, ...]:
        """The documents that are not gold, in context order."""
        gold = set(self.gold)
        return tuple(d for i, d in enumerate(self.documents) if i not in gold)

    @property
    def noise_ratio(self) -> float:
        """Share of the documents that are distractors."""
        return 1.0 - len(self.gold) / len(self.documents)


@dataclass(frozen=True)
class ChatExample:
    """A conversation whose last message (the assistant's) is the target; the loss covers that message only.

    ``gold`` optionally names a passage (a substring of an earlier message) whose token span is recorded when the
    example is encoded, so attention to it can be measured as for a document example.
    """

    messages: tuple[Mapping[str, str], ...]
    gold: str | None = None
    meta: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        messages = tuple(dict(m) for m in self.messages)
        object.__setattr__(self, "messages", messages)
        if len(messages) < 2:
            raise ValueError("messages must hold at least one prompt message and the final assistant message")
        for i, m in enumerate(messages):
            if not isinstance(m.get("content"), str):
                raise ValueError(f"message {i} needs a string 'content'")
            if m.get("role") not in ROLES:
                raise ValueError(f"message {i} has role {m.get('role')!r}; accepted: {', '.join(ROLES)}")
        if messages[-1]["role"] != "assistant":
            raise ValueError("the last message must have role 'assistant' (it is the answer the loss covers)")
        if self.gold is not None and not any(self.gold in m["content"] for m in messages[:-1]):
            raise ValueError("gold must be a substring of one of the prompt messages")

    @property
    def answer(self) -> str:
        """The target: the content of the last (assistant) message."""
        return self.messages[-1]["content"]


Example = NoisyExample | ChatExample


def num_distractors(noise_ratio: float, num_gold: int = 1) -> int:
    """Distractors at noise ratio ``r``: ``round(1 / (1 - r)) - 1`` for one gold document.

    With ``g`` gold documents the count is ``round(g / (1 - r)) - g``, so distractors are still the share ``r`` of
    the context. Halves round up (``r = 0.6 -> 2``), not to even, and a small tolerance absorbs float error
    (``1 - 0.9`` is not exactly 0.1).
    """
    if isinstance(noise_ratio, bool) or not isinstance(noise_ratio, int | float) or not 0.0 <= noise_ratio < 1.0:
        raise ValueError(f"noise ratio must be a number in [0, 1), got {noise_ratio!r}")
    if num_gold < 1:
        raise ValueError(f"num_gold must be >= 1, got {num_gold}")
    return int(math.floor(num_gold / (1.0 - noise_ratio) + 0.5 + 1e-9)) - num_gold


def as_rng(rng: int | random.Random | None) -> random.Random:
    """A ``random.Random`` from a seed (or the generator itself, shared so consecutive calls differ)."""
    if isinstance(rng, random.Random):
        return rng
    if rng is None:
        raise ValueError("pass a seed or a random.Random: noisy examples must be reproducible")
    return random.Random(rng)


def build_noisy_example(
    example: NoisyExample,
    noise_ratio: float,
    *,
    rng: int | random.Random,
    distractor_pool: Sequence[str] | None = None,
    num: int | None = None,
) -> NoisyExample:
    """The gold document(s) among ``num_distractors(noise_ratio, len(gold))`` distractors, at random positions.

    Distractors are drawn without replacement from the example's own non-gold documents first (for retrieval data these
    are the hard, on-topic ones), then from ``distractor_pool`` (typically documents of other examples); pool entries
    equal to a gold document are skipped. Every gold document lands at a uniformly random position (several gold
    documents keep their relative order). ``num`` overrides the count computed from the ratio. Raises ``ValueError``
    when there are not enough distractors.
    """
    r = as_rng(rng)
    k = num_distractors(noise_ratio, len(example.gold)) if num is None else num
    if k < 0:
        raise ValueError(f"num must be >= 0, got {k}")
    gold_docs = list(example.gold_documents)
    own = list(example.distractors)
    chosen = r.sample(own, min(k, len(own)))
    if len(chosen) < k:
        pool = distractor_pool or ()
        excluded = set(gold_docs) | set(chosen)
        for doc in _sample_pool(pool, r):
            if len(chosen) == k:
                break
            if doc not in excluded:
                chosen.append(doc)
                excluded.add(doc)
        if len(chosen) < k:
            raise ValueError(
                f"noise ratio {noise_ratio} needs {k} distractors but only {len(chosen)} are available "
                f"({len(own)} of the example's own, the rest from a pool of {len(pool)}); pass a larger distractor_pool"
            )
    r.shuffle(chosen)
    total = len(chosen) + len(gold_docs)
    gold_positions = sorted(r.sample(range(total), len(gold_docs)))
    documents: list[str] = []
    it_gold, it_distr = iter(gold_docs), iter(chosen)
    for pos in range(total):
        documents.append(next(it_gold) if pos in gold_positions else next(it_distr))
    return dataclasses.replace(example, documents=tuple(documents), gold=tuple(gold_positions))


def _sample_pool(pool: Sequence[str], rng: random.Random) -> Iterator[str]:
    """Pool entries in random order without replacement, lazily: a large pool is not copied for a few draws."""
    if len(pool) <= 4096:
        order = list(range(len(pool)))
        rng.shuffle(order)
        yield from (pool[i] for i in order)
        return
    seen: set[int] = set()
    while len(seen) < len(pool):
        i = rng.randrange(len(pool))
        if i not in seen:
            seen.add(i)
            yield pool[i]


def noisy_examples(
    examples: Iterable[NoisyExample],
    noise_ratio: float | Sequence[float],
    *,
    seed: int,
    use_pool: bool = True,
) -> list[NoisyExample]:
    """``build_noisy_example`` over a data set; the pool (when ``use_pool``) is every other example's documents.

    ``noise_ratio`` is one ratio for every example, or a sequence of ratios (a noise mix): each example then gets a
    ratio drawn uniformly from it. One generator seeded with ``seed`` is shared across the examples (and the draws),
    so the whole list is reproducible.
    """
    items = list(examples)
    rng = random.Random(seed)
    pool = [doc for ex in items for doc in ex.documents] if use_pool else None
    mix = [float(noise_ratio)] if isinstance(noise_ratio, int | float) else [float(r) for r in noise_ratio]
    if not mix:
        raise ValueError("a noise mix needs at least one ratio")
    out = []
    for ex in items:
        # A single ratio draws nothing, so the lists built before noise mixes existed are unchanged.
        ratio = mix[0] if len(mix) == 1 else rng.choice(mix)
        # An example's own documents in the pool are skipped by build_noisy_example (its gold never comes back as a
        # "distractor"; its own distractors were already considered first).
        out.append(build_noisy_example(ex, ratio, rng=rng, distractor_pool=pool))
    return out
