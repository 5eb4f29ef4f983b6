"""The embedded synthetic tasks: noisy-context QA about invented people, and a passkey (needle-in-a-haystack) task.

QA. Each example is a small world: a gold person and ``num_candidates`` distractor people whose documents state the
same kinds of attributes. Distractors are chosen to be confusable: most share the gold person's first or last name,
and none shares the asked value, so a model that matches only part of the name, or that answers with the most
frequent value in the context, is wrong. A document states each fact in its own sentence that repeats the full name
(``document_style="facts"``, the default, about 20 tokens), or all facts in one sentence (``"sentence"``)::

    Kalo Dremet lives in Varnok. Kalo Dremet owns a heron. Kalo Dremet works as a tailor.
    Kalo Dremet lives in Varnok, owns a heron and works as a tailor.
    Question: Where does Kalo Dremet live?    Answer: Varnok

The "facts" style puts the full name a few tokens before every value, so the answer is found by matching the name
and copying what follows it, the lookup a small model learns (see ``attndenoise.tiny``); in the "sentence" style a
value can be ten tokens from the name, and the tiny model never learned to bind them.

Passkey. Following the needle-in-a-haystack / RULER convention, a 5-digit pass key sentence is hidden in repeated
filler sentences at relative depth ``depth`` (0 = start of the context, 1 = end) of a haystack of about
``context_len`` tokens (counted with the embedded word-level tokenizer's pre-tokenizer: words, punctuation marks and
single digits are one token each).

The vocabulary is closed (``lexicon_texts`` lists every word the generator can emit) so the embedded word-level
tokenizer never needs an unknown token for synthetic text.
"""

from __future__ import annotations

import random
import string
from collections.abc import Iterator
from dataclasses import dataclass

from .examples import NoisyExample
from .tokenizer import FORMAT_WORDS, pre_tokenizer, vocabulary_from_texts

FIRST_NAMES = (
    "Alvo", "Bexa", "Corin", "Dalen", "Esko", "Fenna", "Galo", "Hesta", "Ivor", "Jorra", "Kalo", "Lenna",
    "Mavi", "Noro", "Ossa", "Pelle", "Quen", "Rilo", "Sava", "Tovi", "Ulla", "Vesko", "Wenna", "Yaro",
)
LAST_NAMES = (
    "Ambrel", "Brisko", "Caldor", "Dremet", "Elmark", "Farrow", "Gaddis", "Holven", "Istar", "Jarrow", "Kettan",
    "Lorne", "Marrik", "Nesbet", "Orlan", "Pemby", "Quarrel", "Ruskin", "Sorrel", "Tallis", "Umbera", "Vennick",
    "Wexley", "Yarrow",
)


@dataclass(frozen=True)
class Attribute:
    """One kind of fact about a person: how a document states it, how a question asks it, and its closed value set."""

    name: str
    clause: str  # "{v}" is the value
    question: str  # "{name}" is the person
    values: tuple[str, ...]


ATTRIBUTES = (
    Attribute("city", "lives in {v}", "Where does {name} live?", (
        "Dovra", "Kelmir", "Talun", "Osvey", "Brenhal", "Miradun", "Quessa", "Varnok", "Lindar", "Zeppa", "Horvik",
        "Anzara", "Pellow", "Sarnet", "Trova", "Ulmen",
    )),
    Attribute("job", "works as a {v}", "What does {name} work as?", (
        "baker", "miner", "tailor", "potter", "weaver", "sailor", "farmer", "healer", "scribe", "smith", "hunter",
        "brewer", "mason", "painter", "fisher", "archer",
    )),
    Attribute("pet", "owns a {v}", "Which animal does {name} own?", (
        "fox", "wolf", "cat", "goat", "crow", "hare", "toad", "lynx", "newt", "ferret", "heron", "mole",
    )),
    Attribute("color", "likes the color {v}", "Which color does {name} like?", (
        "red", "blue", "green", "amber", "violet", "teal", "ochre", "silver", "crimson", "indigo", "olive", "coral",
    )),
)
ATTRIBUTE_BY_NAME = {a.name: a for a in ATTRIBUTES}
DOCUMENT_STYLES = ("sentence", "facts")

# The passkey task's filler and needle, in the wording of the original passkey-retrieval test (Mohtashami & Jaggi,
# 2023) that RULER and needle-in-a-haystack suites reuse.
FILLER = (
    "The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again.",
)
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
NEEDLE_QUESTION = "What is the pass key?"


def lexicon_texts() -> list[str]:
    """Every word and punctuation mark the generators can emit (for building a closed vocabulary)."""
    texts = [*FIRST_NAMES, *LAST_NAMES, *FILLER, NEEDLE.format(key="0123456789"), NEEDLE_QUESTION, ", and ."]
    for a in ATTRIBUTES:
        texts += [a.clause.format(v=""), a.question.format(name=""), *a.values]
    return texts


def vocabulary() -> list[str]:
    """The embedded tokenizer's vocabulary: special tokens, digits, ASCII punctuation, the prompt format's words,
    then every word of the synthetic tasks (a closed vocabulary: their text never needs an unknown token)."""
    return vocabulary_from_texts([*string.digits, *string.punctuation, *FORMAT_WORDS, *lexicon_texts()])


def count_tokens(text: str) -> int:
    """Length of ``text`` in the embedded tokenizer's units (words, punctuation marks, single digits)."""
    return len(pre_tokenizer().pre_tokenize_str(text))


@dataclass(frozen=True)
class Person:
    first: str
    last: str
    facts: dict[str, str]

    @property
    def name(self) -> str:
        return f"{self.first} {self.last}"


class SyntheticQA:
    """Seeded generator of the embedded tasks.

    ``SyntheticQA(seed).examples(n)`` gives ``n`` QA examples, each with the gold document at index 0 followed by its
    ``num_candidates`` similar-person distractors (pass them to ``build_noisy_example`` to pick a noise ratio and
    shuffle). ``split`` separates streams: the same seed with ``split="train"`` and ``split="test"`` gives unrelated
    examples, so held-out questions never come from the pretraining stream.

    ``attributes_per_document`` facts are stated per person (the asked one always among them, in a random order);
    ``share_name`` is the probability that a distractor shares the gold person's first or last name;
    ``document_style`` is ``"facts"`` or ``"sentence"`` (see the module docstring).
    """

    def __init__(
        self,
        seed: int = 0,
        *,
        split: str = "train",
        num_candidates: int = 9,
        attributes_per_document: int = 3,
        share_name: float = 0.8,
        document_style: str = "facts",
    ) -> None:
        if document_style not in DOCUMENT_STYLES:
            raise ValueError(f"document_style must be one of {', '.join(DOCUMENT_STYLES)}, got {document_style!r}")
        if not 1 <= attributes_per_document <= len(ATTRIBUTES):
            raise ValueError(
                f"attributes_per_document must be in [1, {len(ATTRIBUTES)}], got {attributes_per_document}"
            )
        if not 0 <= num_candidates <= min(len(v.values) for v in ATTRIBUTES) - 1:
            raise ValueError(f"num_candidates must be in [0, 11] (distinct values per attribute), got {num_candidates}")
        if not 0.0 <= share_name <= 1.0:
            raise ValueError(f"share_name must be a probability, got {share_name}")
        self.seed = seed
        self.split = split
        self.num_candidates = num_candidates
        self.attributes_per_document = attributes_per_document
        self.share_name = share_name
        self.document_style = document_style
        # A string seed is hashed with SHA-512 by `random`, independent of PYTHONHASHSEED: reproducible across runs.
        self.rng = random.Random(f"attndenoise-synthetic:{split}:{seed}")

    # -- QA -------------------------------------------------------------------------------------------------------
    def examples(self, n: int) -> list[NoisyExample]:
        """``n`` QA examples (gold document first, then its distractor candidates)."""
        return [self.example() for _ in range(n)]

    def __iter__(self) -> Iterator[NoisyExample]:
        while True:
            yield self.example()

    def example(self) -> NoisyExample:
        """One QA example: a gold person, ``num_candidates`` similar people, a question about one attribute."""
        r = self.rng
        asked = r.choice(ATTRIBUTES)
        others = [a for a in ATTRIBUTES if a is not asked]
        gold = self._person(r.choice(FIRST_NAMES), r.choice(LAST_NAMES))
        # Distinct values for the asked attribute: a distractor that answered the question would make it ambiguous.
        asked_values = r.sample(asked.values, self.num_candidates + 1)
        gold.facts[asked.name] = asked_values[0]
        used = {gold.name}
        people = [gold]
        for value in asked_values[1:]:
            p = self._similar(gold, used)
            p.facts[asked.name] = value
            used.add(p.name)
            people.append(p)
        docs, stated = zip(*(self._document_facts(p, asked, others) for p in people), strict=True)
        return NoisyExample(
            question=asked.question.format(name=gold.name), documents=tuple(docs), gold=(0,),
            answer=gold.facts[asked.name],
            # `facts` maps each document to its person and the attributes it states: questions about the other
            # people of the context can be asked from it (the pretraining mixture does).
            meta={"task": "qa", "attribute": asked.name, "entity": gold.name,
                  "facts": {d: (p.name, f) for d, p, f in zip(docs, people, stated, strict=True)}},
        )

    def documents(self, n: int) -> list[str]:
        """``n`` documents about random people (for plain language-model text)."""
        out = []
        for _ in range(n):
            p = self._person(self.rng.choice(FIRST_NAMES), self.rng.choice(LAST_NAMES))
            asked = self.rng.choice(ATTRIBUTES)
            out.append(self._document(p, asked, [a for a in ATTRIBUTES if a is not asked]))
        return out

    def _person(self, first: str, last: str) -> Person:
        return Person(first, last, {a.name: self.rng.choice(a.values) for a in ATTRIBUTES})

    def _similar(self, gold: Person, used: set[str]) -> Person:
        r = self.rng
        while True:
            u = r.random()
            if u < self.share_name / 2:
                first, last = gold.first, r.choice(LAST_NAMES)
            elif u < self.share_name:
                first, last = r.choice(FIRST_NAMES), gold.last
            else:
                first, last = r.choice(FIRST_NAMES), r.choice(LAST_NAMES)
            if f"{first} {last}" not in used:
                return self._person(first, last)

    def _document(self, p: Person, asked: Attribute, others: list[Attribute]) -> str:
        return self._document_facts(p, asked, others)[0]

    def _document_facts(self, p: Person, asked: Attribute, others: list[Attribute]) -> tuple[str, dict[str, str]]:
        attrs = [asked, *self.rng.sample(others, self.attributes_per_document - 1)]
        self.rng.shuffle(attrs)
        clauses = [a.clause.format(v=p.facts[a.name]) for a in attrs]
        if self.document_style == "facts":
            return " ".join(f"{p.name} {c}." for c in clauses), {a.name: p.facts[a.name] for a in attrs}
        body = clauses[0] if len(clauses) == 1 else ", ".join(clauses[:-1]) + " and " + clauses[-1]
        return f"{p.name} {body}.", {a.name: p.facts[a.name] for a in attrs}

    # -- passkey --------------------------------------------------------------------------------------------------
    @staticmethod
    def needle(context_len: int, depth: float, seed: int = 0, *, digits: int = 5) -> NoisyExample:
        """A passkey example: ``context_len`` tokens of filler with the pass key sentence at relative ``depth``.

        The context is laid out ``"plain"``: each sentence is a "document" and the needle sentence is the gold one, so
        its token span is recorded like a gold document's. ``context_len`` counts the needle too; the haystack is
        rounded to whole sentences (never shorter than the needle alone).
        """
        if not 0.0 <= depth <= 1.0:
            raise ValueError(f"depth must be in [0, 1] (0 = start of the context, 1 = end), got {depth}")
        if context_len < 1:
            raise ValueError(f"context_len must be positive, got {context_len}")
        r = random.Random(f"attndenoise-needle:{seed}:{context_len}:{depth}")
        key = str(r.randrange(10 ** (digits - 1), 10**digits))
        needle = NEEDLE.format(key=key)
        budget = context_len - count_tokens(needle)
        filler: list[str] = []
        lengths = [count_tokens(s) for s in FILLER]
        start = r.randrange(len(FILLER))
        used = 0
        while True:
            i = (start + len(filler)) % len(FILLER)
            # Stop at the sentence boundary closest to the budget.
            if used + lengths[i] / 2 > budget:
                break
            filler.append(FILLER[i])
            used += lengths[i]
        # Insert at the sentence boundary closest to depth * (filler length), measured in tokens.
        cum = [0]
        for s in filler:
            cum.append(cum[-1] + count_tokens(s))
        target = depth * cum[-1]
        pos = min(range(len(cum)), key=lambda j: (abs(cum[j] - target), j))
        documents = (*filler[:pos], needle, *filler[pos:])
        return NoisyExample(
            question=NEEDLE_QUESTION, documents=documents, gold=(pos,), answer=key, layout="plain",
            meta={"task": "passkey", "context_len": context_len, "depth": depth},
        )
