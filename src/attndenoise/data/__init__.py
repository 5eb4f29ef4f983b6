"""Noisy-context data: examples and noise ratios, loading local files, prompt formatting and training encodings, the
embedded synthetic tasks and their word-level tokenizer.

Typical use::

    from attndenoise.data import SyntheticQA, build_noisy_example, encode_for_training

    raw = SyntheticQA(seed=0, split="test").examples(100)
    noisy = [build_noisy_example(ex, 0.9, rng=i) for i, ex in enumerate(raw)]
    enc = encode_for_training(noisy[0], tokenizer, max_length=512)
    enc.input_ids, enc.labels, enc.gold_span
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from .examples import ChatExample, Example, NoisyExample, build_noisy_example, noisy_examples, num_distractors
from .formatting import (
    DEFAULT_FORMAT,
    IGNORE_INDEX,
    EncodedExample,
    EncodeReport,
    ExampleTooLongError,
    Prompt,
    PromptFormat,
    collate,
    drop_order,
    encode_examples,
    encode_for_training,
    format_context,
    format_prompt,
    without_documents,
)
from .loading import DataFormatError, examples_from_records, load_examples, parse_record
from .retrieval import (
    LITM_FORMAT,
    SPLIT_SIZES,
    MultiDocRecord,
    Passage,
    PassagePool,
    build_multidoc_example,
    contains_answer,
    default_split_sizes,
    gold_indices,
    gold_passage,
    multidoc_examples,
    read_multidoc_qa,
    read_passages,
    render_passage,
    split_records,
    squad_normalize,
)
from .synthetic import ATTRIBUTES, SyntheticQA, count_tokens, lexicon_texts
from .synthetic import vocabulary as default_vocabulary
from .tokenizer import (
    UnknownTokensWarning,
    normalize_answer,
    unknown_token_share,
    vocabulary_from_texts,
    warn_unknown_tokens,
)
from .tokenizer import (
    build_tokenizer as _build_tokenizer,
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast


def build_tokenizer(
    vocabulary: Iterable[str] | None = None, *, model_max_length: int = 2048
) -> PreTrainedTokenizerFast:
    """The embedded word-level tokenizer (:func:`attndenoise.data.tokenizer.build_tokenizer`) over ``vocabulary``,
    by default the embedded tasks' closed vocabulary (:func:`default_vocabulary`)."""
    return _build_tokenizer(default_vocabulary() if vocabulary is None else vocabulary,
                            model_max_length=model_max_length)


__all__ = [
    "NoisyExample", "ChatExample", "Example", "num_distractors", "build_noisy_example", "noisy_examples",
    "load_examples", "examples_from_records", "parse_record", "DataFormatError",
    "Passage", "MultiDocRecord", "read_multidoc_qa", "read_passages", "gold_passage", "gold_indices", "split_records",
    "default_split_sizes",
    "SPLIT_SIZES", "PassagePool", "build_multidoc_example", "multidoc_examples", "render_passage", "LITM_FORMAT",
    "squad_normalize", "contains_answer",
    "PromptFormat", "DEFAULT_FORMAT", "Prompt", "format_context", "format_prompt", "EncodedExample",
    "encode_for_training", "encode_examples", "EncodeReport", "ExampleTooLongError", "IGNORE_INDEX", "collate",
    "drop_order", "without_documents",
    "SyntheticQA", "ATTRIBUTES", "lexicon_texts", "count_tokens",
    "build_tokenizer", "default_vocabulary", "vocabulary_from_texts", "normalize_answer",
    "UnknownTokensWarning", "unknown_token_share", "warn_unknown_tokens",
]
