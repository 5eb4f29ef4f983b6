"""Prompts, training encodings (loss on the answer only), gold-span token ranges, and the over-length policy.

Prompt format. When the tokenizer has a chat template, the context (documents, then the question) is the user message
and the answer is the assistant message, rendered by the template; the prompt ends with the template's generation
prompt and the completion is whatever the template writes for the assistant turn (its end-of-turn marker included, so
the model learns to stop). Without a chat template the documented default (``PromptFormat``) is::

    Document [1]: <text of document 0>
    Document [2]: <text of document 1>

    Question: <question>
    Answer: <answer></s>

(a ``"plain"`` layout joins the documents with single spaces instead of numbering them; a chat example without a
template is rendered as ``Role: content`` lines ending in ``Assistant:``). The prompt is tokenized with the tokenizer's
special tokens (``<s>`` for the embedded tokenizer), the completion `` <answer>`` without them, and the EOS token is
appended. Prompt and completion are tokenized separately, as generation sees them.

Labels are ``-100`` on every prompt token; the completion tokens (answer, then EOS or the end-of-turn marker) are
their own labels.

Over-length policy (``max_length`` counts prompt and completion tokens): no document is ever truncated. Distractors are
dropped first, farthest from a gold document first (ties: the later one), so the gold document keeps its closest
neighbours; the drop count is recorded in ``EncodedExample.dropped_distractors``. When the gold document(s), question
and answer alone do not fit (or a chat example does not fit), ``encode_for_training`` raises ``ExampleTooLongError``;
``encode_examples(..., on_too_long="skip")`` skips such examples instead, warns once with the count and reports their
indices.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from .examples import ChatExample, Example, NoisyExample

IGNORE_INDEX = -100
Span = tuple[int, int]


class ExampleTooLongError(ValueError):
    """The gold document(s), question and answer alone exceed ``max_length`` tokens (documents are never truncated)."""


@dataclass(frozen=True)
class PromptFormat:
    """The default prompt layout, used when the tokenizer has no chat template (also the user message otherwise)."""

    document: str = "Document [{index}]: {text}"  # index is 1-based
    document_separator: str = "\n"
    plain_separator: str = " "
    context_separator: str = "\n\n"
    question: str = "Question: {question}"
    answer_prefix: str = "\nAnswer:"
    answer: str = " {answer}"
    chat_turn: str = "{role}: {content}"  # role capitalised; used for chat examples without a template
    chat_separator: str = "\n"
    # Also state the question before the documents ("query-aware contextualization", Liu et al. 2023, Lost in the
    # Middle): a causal model can then read each document knowing what is asked.
    question_first: bool = False
    # A line before everything else (e.g. the task instruction of Lost in the Middle), followed by context_separator.
    instruction: str = ""


DEFAULT_FORMAT = PromptFormat()


@dataclass(frozen=True)
class Prompt:
    """A formatted example: the prompt text, the completion to learn, and character spans of the documents.

    Tokenize ``text`` with ``add_special_tokens=self.add_special_tokens`` (``False`` for chat-template output, which
    already holds its special tokens), ``completion`` without special tokens, then append EOS if ``append_eos``.
    """

    text: str
    completion: str
    add_special_tokens: bool
    append_eos: bool
    uses_chat_template: bool
    document_spans: tuple[Span, ...] = ()  # character ranges [start, end) of each document's text in `text`
    gold_spans: tuple[Span, ...] = ()  # character ranges of the gold documents (or the chat example's gold passage)


@dataclass
class EncodedExample:
    """Token ids for training, with the token ranges a later attention measure needs.

    ``gold_spans`` / ``document_spans`` are ``[start, end)`` index ranges into ``input_ids`` covering each gold /
    every document's text (not its ``Document [i]:`` header). ``prompt_length`` is where the completion starts: the
    prompt for generation is ``input_ids[:prompt_length]``.
    """

    input_ids: list[int]
    attention_mask: list[int]
    labels: list[int]
    prompt_length: int
    gold_spans: list[Span]
    document_spans: list[Span]
    example: Example
    dropped_distractors: int = 0

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def gold_span(self) -> Span:
        """The single gold span (``ValueError`` when the example has several gold documents, or none recorded)."""
        if len(self.gold_spans) != 1:
            raise ValueError(f"the example has {len(self.gold_spans)} gold spans; read gold_spans")
        return self.gold_spans[0]

    def features(self) -> dict[str, list[int]]:
        """The model inputs (``input_ids``, ``attention_mask``, ``labels``) as plain lists."""
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask, "labels": self.labels}


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def format_context(example: NoisyExample, fmt: PromptFormat = DEFAULT_FORMAT) -> tuple[str, list[Span]]:
    """The documents and the question as one text, with each document's character span in it."""
    parts: list[str] = []
    spans: list[Span] = []
    if fmt.instruction:
        parts.append(fmt.instruction + fmt.context_separator)
    if fmt.question_first:
        parts.append(fmt.question.format(question=example.question) + fmt.context_separator)
    pos = sum(len(p) for p in parts)
    for i, doc in enumerate(example.documents):
        if i:
            sep = fmt.plain_separator if example.layout == "plain" else fmt.document_separator
            parts.append(sep)
            pos += len(sep)
        if example.layout == "plain":
            piece, offset = doc, 0
        else:
            piece = fmt.document.format(index=i + 1, text=doc)
            # Locate the text inside its header from the template, so a format putting text before the index works.
            prefix = fmt.document.split("{text}")[0].format(index=i + 1)
            offset = len(prefix)
        parts.append(piece)
        spans.append((pos + offset, pos + offset + len(doc)))
        pos += len(piece)
    parts.append(fmt.context_separator + fmt.question.format(question=example.question))
    return "".join(parts), spans


def format_prompt(example: Example, tokenizer: Any, fmt: PromptFormat = DEFAULT_FORMAT) -> Prompt:
    """The prompt and completion of ``example`` for ``tokenizer`` (its chat template if it has one, else ``fmt``)."""
    chat = has_chat_template(tokenizer)
    if isinstance(example, NoisyExample):
        context, spans = format_context(example, fmt)
        if not chat:
            text = context + fmt.answer_prefix
            doc_spans = tuple(spans)
            return Prompt(
                text=text, completion=fmt.answer.format(answer=example.answer), add_special_tokens=True,
                append_eos=True, uses_chat_template=False, document_spans=doc_spans,
                gold_spans=tuple(doc_spans[g] for g in sorted(example.gold)),
            )
        messages = [{"role": "user", "content": context}, {"role": "assistant", "content": example.answer}]
        text, completion = _render_chat(tokenizer, messages)
        doc_spans = tuple(_locate(text, context, spans, example.documents))
        return Prompt(
            text=text, completion=completion, add_special_tokens=False, append_eos=False, uses_chat_template=True,
            document_spans=doc_spans, gold_spans=tuple(doc_spans[g] for g in sorted(example.gold)),
        )
    if isinstance(example, ChatExample):
        if chat:
            text, completion = _render_chat(tokenizer, [dict(m) for m in example.messages])
            add_special, append_eos = False, False
        else:
            turns = [fmt.chat_turn.format(role=m["role"].capitalize(), content=m["content"])
                     for m in example.messages[:-1]]
            turns.append(fmt.chat_turn.format(role="Assistant", content="").rstrip())
            text = fmt.chat_separator.join(turns)
            completion = " " + example.answer
            add_special, append_eos = True, True
        gold: tuple[Span, ...] = ()
        if example.gold is not None:
            start = text.find(example.gold)
            if start < 0:
                raise ValueError("the chat example's gold passage does not appear in the rendered prompt")
            gold = ((start, start + len(example.gold)),)
        return Prompt(
            text=text, completion=completion, add_special_tokens=add_special, append_eos=append_eos,
            uses_chat_template=chat, gold_spans=gold,
        )
    raise TypeError(f"expected a NoisyExample or ChatExample, got {type(example).__name__}")


def _render_chat(tokenizer: Any, messages: list[dict[str, str]]) -> tuple[str, str]:
    """(prompt ending with the generation prompt, completion = what the template writes for the last message)."""
    prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    if full.startswith(prompt):
        return prompt, full[len(prompt):]
    # Some templates render earlier turns differently once an assistant turn follows (e.g. dropping reasoning);
    # then the completion cannot be read off the full rendering: use the answer and the EOS token.
    eos = getattr(tokenizer, "eos_token", None) or ""
    return prompt, messages[-1]["content"] + eos


def _locate(text: str, context: str, spans: list[Span], documents: Sequence[str]) -> list[Span]:
    """Character spans of the documents in a rendered chat prompt."""
    base = text.find(context)
    if base >= 0:
        return [(s + base, e + base) for s, e in spans]
    # The template changed the message (e.g. stripped whitespace): find the documents one after another.
    out, cursor = [], 0
    for doc in documents:
        start = text.find(doc, cursor)
        if start < 0:
            raise ValueError("a document does not appear verbatim in the chat-template output; cannot record spans")
        out.append((start, start + len(doc)))
        cursor = start + len(doc)
    return out


def _tokenize_prompt(tokenizer: Any, prompt: Prompt) -> tuple[list[int], list[Span]]:
    """Prompt token ids, and the token ranges of ``prompt.gold_spans + prompt.document_spans``.

    A token overlapping a character range counts as inside it (a BPE token such as ``" Kalo"`` starts at the space
    before the document).
    """
    char_spans = [*prompt.gold_spans, *prompt.document_spans]
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(prompt.text, add_special_tokens=prompt.add_special_tokens, return_offsets_mapping=True)
        offsets = enc["offset_mapping"]
        out = []
        for cs, ce in char_spans:
            hit = [i for i, (s, e) in enumerate(offsets) if e > s and e > cs and s < ce]
            if not hit:
                raise ValueError(f"no token covers characters {cs}-{ce} of the prompt")
            out.append((hit[0], hit[-1] + 1))
        return list(enc["input_ids"]), out

    # A slow tokenizer has no offsets: count the tokens of prefixes (exact for word-level tokenizers, off by at most
    # a token at the boundary for subword ones).
    def n_tokens(prefix: str) -> int:
        return len(tokenizer(prefix, add_special_tokens=prompt.add_special_tokens)["input_ids"])

    ids = list(tokenizer(prompt.text, add_special_tokens=prompt.add_special_tokens)["input_ids"])
    return ids, [(n_tokens(prompt.text[:cs].rstrip()), n_tokens(prompt.text[:ce])) for cs, ce in char_spans]


def _encode_once(example: Example, tokenizer: Any, fmt: PromptFormat) -> EncodedExample:
    prompt = format_prompt(example, tokenizer, fmt)
    prompt_ids, spans = _tokenize_prompt(tokenizer, prompt)
    completion_ids = list(tokenizer(prompt.completion, add_special_tokens=False)["input_ids"])
    if prompt.append_eos:
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no EOS token: set tokenizer.eos_token so the model can learn to stop")
        completion_ids.append(tokenizer.eos_token_id)
    if not completion_ids:
        raise ValueError("the answer encodes to no tokens")
    ids = prompt_ids + completion_ids
    n_gold = len(prompt.gold_spans)
    return EncodedExample(
        input_ids=ids,
        attention_mask=[1] * len(ids),
        labels=[IGNORE_INDEX] * len(prompt_ids) + completion_ids,
        prompt_length=len(prompt_ids),
        gold_spans=spans[:n_gold],
        document_spans=spans[n_gold:],
        example=example,
    )


def drop_order(example: NoisyExample) -> list[int]:
    """Distractor indices in the order the over-length policy drops them: farthest from any gold first, later first."""
    gold = sorted(example.gold)
    distractors = [i for i in range(len(example.documents)) if i not in example.gold]
    return sorted(distractors, key=lambda i: (min(abs(i - g) for g in gold), i), reverse=True)


def without_documents(example: NoisyExample, drop: Iterable[int]) -> NoisyExample:
    """The example with the given (non-gold) documents removed, gold indices renumbered."""
    dropped = set(drop)
    if dropped & set(example.gold):
        raise ValueError("cannot drop a gold document")
    keep = [i for i in range(len(example.documents)) if i not in dropped]
    new_index = {old: new for new, old in enumerate(keep)}
    return dataclasses.replace(example, documents=tuple(example.documents[i] for i in keep),
                               gold=tuple(new_index[g] for g in example.gold))


def encode_for_training(
    example: Example,
    tokenizer: Any,
    max_length: int | None = None,
    *,
    fmt: PromptFormat = DEFAULT_FORMAT,
    overflow: Literal["drop_distractors", "error"] = "drop_distractors",
) -> EncodedExample:
    """``input_ids``, ``attention_mask``, ``labels`` (answer tokens only) and gold/document token spans.

    Over ``max_length`` tokens, distractors are dropped as the module docstring describes (``overflow="error"`` raises
    instead); ``ExampleTooLongError`` when even the gold document(s), question and answer do not fit.
    """
    if overflow not in ("drop_distractors", "error"):
        raise ValueError(f"overflow must be 'drop_distractors' or 'error', got {overflow!r}")
    enc = _encode_once(example, tokenizer, fmt)
    if max_length is None or len(enc) <= max_length:
        return enc
    where = f"{len(enc)} tokens > max_length {max_length}"
    if isinstance(example, ChatExample):
        raise ExampleTooLongError(f"chat example of {where}; chat examples are never truncated")
    assert isinstance(example, NoisyExample)
    order = drop_order(example)
    if overflow == "error" or not order:
        raise ExampleTooLongError(f"example of {where} (overflow={overflow!r}, {len(order)} distractors)")
    # Estimate each document's cost (its tokens plus the smallest header/separator gap) to drop enough in one go;
    # the estimate never exceeds the true saving, and the loop below adds drops until the encoding fits.
    spans = enc.document_spans
    gap = min((spans[i + 1][0] - spans[i][1] for i in range(len(spans) - 1)), default=0)
    cost = {i: e - s + gap for i, (s, e) in enumerate(spans)}
    excess = len(enc) - max_length
    n_drop, saved = 0, 0
    while n_drop < len(order) and saved < excess:
        saved += cost[order[n_drop]]
        n_drop += 1
    while True:
        reduced = without_documents(example, order[:n_drop])
        enc = _encode_once(reduced, tokenizer, fmt)
        if len(enc) <= max_length:
            enc.dropped_distractors = n_drop
            return enc
        if n_drop == len(order):
            raise ExampleTooLongError(
                f"the gold document(s), question and answer alone take {len(enc)} tokens > max_length {max_length}; "
                "documents are never truncated: raise max_length or shorten the example"
            )
        n_drop += 1


@dataclass
class EncodeReport:
    """What ``encode_examples`` produced: the encodings and the indices of the examples it skipped as too long."""

    encoded: list[EncodedExample]
    skipped: list[int] = field(default_factory=list)
    dropped_distractors: int = 0  # summed over the kept examples


def encode_examples(
    examples: Iterable[Example],
    tokenizer: Any,
    max_length: int | None = None,
    *,
    fmt: PromptFormat = DEFAULT_FORMAT,
    overflow: Literal["drop_distractors", "error"] = "drop_distractors",
    on_too_long: Literal["error", "skip"] = "error",
) -> EncodeReport:
    """``encode_for_training`` over a data set; ``on_too_long="skip"`` skips what cannot fit, warning with the count."""
    if on_too_long not in ("error", "skip"):
        raise ValueError(f"on_too_long must be 'error' or 'skip', got {on_too_long!r}")
    report = EncodeReport(encoded=[])
    total = 0
    for i, ex in enumerate(examples):
        total += 1
        try:
            enc = encode_for_training(ex, tokenizer, max_length, fmt=fmt, overflow=overflow)
        except ExampleTooLongError as e:
            if on_too_long == "error":
                raise ExampleTooLongError(f"example {i}: {e}") from None
            report.skipped.append(i)
            continue
        report.encoded.append(enc)
        report.dropped_distractors += enc.dropped_distractors
    if report.skipped:
        warnings.warn(
            f"skipped {len(report.skipped)} of {total} examples that do not fit in max_length={max_length} "
            f"even without distractors (indices in EncodeReport.skipped)",
            stacklevel=2,
        )
    return report


def collate(
    batch: Sequence[EncodedExample | dict[str, list[int]]],
    pad_token_id: int,
    *,
    padding_side: Literal["right", "left"] = "right",
    pad_to_multiple_of: int | None = None,
) -> dict[str, torch.Tensor]:
    """Pad a batch into ``input_ids``, ``attention_mask``, ``labels`` tensors (labels padded with -100).

    Left padding (for batched generation) shifts every token index by the pad length; the spans of an
    ``EncodedExample`` are not adjusted here.
    """
    feats = [b.features() if isinstance(b, EncodedExample) else b for b in batch]
    if not feats:
        raise ValueError("empty batch")
    n = max(len(f["input_ids"]) for f in feats)
    if pad_to_multiple_of:
        n = -(-n // pad_to_multiple_of) * pad_to_multiple_of
    out = {k: torch.full((len(feats), n), v, dtype=torch.long)
           for k, v in (("input_ids", pad_token_id), ("attention_mask", 0), ("labels", IGNORE_INDEX))}
    for row, f in enumerate(feats):
        length = len(f["input_ids"])
        sl = slice(0, length) if padding_side == "right" else slice(n - length, n)
        out["input_ids"][row, sl] = torch.tensor(f["input_ids"])
        out["attention_mask"][row, sl] = torch.tensor(f.get("attention_mask", [1] * length))
        out["labels"][row, sl] = torch.tensor(f.get("labels", [IGNORE_INDEX] * length))
    return out
