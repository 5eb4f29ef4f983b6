"""The embedded word-level tokenizer (``tokenizers`` WordLevel, wrapped in ``PreTrainedTokenizerFast``).

Text is split on whitespace, then punctuation marks and digits become tokens of their own, so a closed vocabulary
covers the synthetic tasks and the default prompt format (``Document [12]: ...``) without an unknown token, and
a pass key is read digit by digit. ``<s>`` is prepended to every encoded text (TemplateProcessing); ``</s>`` ends an
answer. Decoding joins tokens with spaces and then removes the space before punctuation, so a synthetic sentence
round-trips exactly except for numbers, whose digits come back space-separated (``attndenoise.evaluate.normalize_text``
joins them).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from functools import cache
from typing import Any

from tokenizers import Tokenizer, pre_tokenizers
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import PreTokenizer
from tokenizers.processors import TemplateProcessing
from transformers import PreTrainedTokenizerFast

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<s>", "</s>"
SPECIAL_TOKENS = (PAD, UNK, BOS, EOS)
# Words of the default prompt format (formatting.py) and of the default chat rendering, plus role names that chat
# templates commonly print.
FORMAT_WORDS = ("Document", "Question", "Answer", "System", "User", "Assistant", "Tool", "system", "user",
                "assistant", "tool")


def pre_tokenizer() -> PreTokenizer:
    """Whitespace split, then each punctuation mark and each digit on its own."""
    return _pre_tokenizer()


@cache
def _pre_tokenizer() -> PreTokenizer:
    return pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Punctuation(behavior="isolated"),
        pre_tokenizers.Digits(individual_digits=True),
    ])


def vocabulary_from_texts(texts: Iterable[str]) -> list[str]:
    """Special tokens first (fixed ids 0-3), then the distinct pre-tokenized pieces of ``texts`` in first-seen order."""
    pieces: dict[str, None] = dict.fromkeys(SPECIAL_TOKENS)
    pre = pre_tokenizer()
    for text in texts:
        for piece, _ in pre.pre_tokenize_str(text):
            pieces.setdefault(piece, None)
    return list(pieces)


def build_tokenizer(vocabulary: Iterable[str], *, model_max_length: int = 2048) -> PreTrainedTokenizerFast:
    """A word-level ``PreTrainedTokenizerFast`` over ``vocabulary`` (the embedded tasks' one:
    ``attndenoise.data.synthetic.vocabulary()``; ``attndenoise.data.build_tokenizer`` takes it by default).

    The vocabulary must start with ``<pad> <unk> <s> </s>`` (ids 0-3). The result has no chat template, so prompts use
    the documented default format; ``save_pretrained`` / ``AutoTokenizer.from_pretrained`` round-trip it offline.
    """
    vocab = list(vocabulary)
    if tuple(vocab[:4]) != SPECIAL_TOKENS:
        raise ValueError(f"the vocabulary must start with {SPECIAL_TOKENS}, got {vocab[:4]}")
    if len(set(vocab)) != len(vocab):
        raise ValueError("the vocabulary has repeated entries")
    ids = {w: i for i, w in enumerate(vocab)}
    tok = Tokenizer(WordLevel(vocab=ids, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizer()
    tok.post_processor = TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {EOS} $B:1", special_tokens=[(BOS, ids[BOS]), (EOS, ids[EOS])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, unk_token=UNK, pad_token=PAD,
        model_max_length=model_max_length, padding_side="right", clean_up_tokenization_spaces=True,
    )


def normalize_answer(text: str) -> str:
    """Deprecated: :func:`attndenoise.evaluate.normalize_text`, the one answer normaliser of the synthetic tasks
    (SQuAD's rule, with the digits a word-level tokenizer decodes apart joined again: ``"7 3 9 1 4"`` -> ``"73914"``).
    """
    from ..evaluate import normalize_text  # lazily: evaluation code imports this module

    warnings.warn("attndenoise.data.normalize_answer is deprecated: use attndenoise.evaluate.normalize_text",
                  DeprecationWarning, stacklevel=2)
    return normalize_text(text)


#: share of unknown tokens above which :func:`warn_unknown_tokens` warns
UNKNOWN_SHARE_WARN = 0.05


class UnknownTokensWarning(UserWarning):
    """The tokenizer turns a large share of the data into its unknown token: the model cannot read those words."""


def unknown_token_share(tokenizer: Any, token_ids: Iterable[Sequence[int]]) -> tuple[int, int]:
    """``(unknown tokens, all tokens)`` in ``token_ids``; ``(0, n)`` for a tokenizer without an unknown token
    (byte-level BPE never needs one)."""
    unk = getattr(tokenizer, "unk_token_id", None)
    count = total = 0
    for ids in token_ids:
        total += len(ids)
        if unk is not None:
            count += sum(1 for t in ids if t == unk)
    return count, total


def warn_unknown_tokens(tokenizer: Any, token_ids: Iterable[Sequence[int]], what: str,
                        threshold: float = UNKNOWN_SHARE_WARN) -> float:
    """Warn (:class:`UnknownTokensWarning`) when more than ``threshold`` of ``token_ids`` are the tokenizer's unknown
    token -- own data outside the tiny model's closed vocabulary would otherwise train and score silently on
    ``<unk>``; returns the share."""
    count, total = unknown_token_share(tokenizer, token_ids)
    share = count / total if total else 0.0
    if share > threshold:
        warnings.warn(
            f"{what}: the tokenizer maps {share:.0%} of the tokens ({count} of {total}) to its unknown token "
            f"{tokenizer.unk_token!r}, so the model cannot read those words. Use a base model whose tokenizer covers "
            "the data (--model smollm2-135m, a model folder or a hub id), or keep to the tokenizer's vocabulary (the "
            "tiny model knows the words of attndenoise.data.synthetic.vocabulary())",
            UnknownTokensWarning, stacklevel=2,
        )
    return share
