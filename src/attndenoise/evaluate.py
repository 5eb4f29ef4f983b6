"""Evaluation of a model in memory (stock, patched, fine-tuned: nothing here depends on how it was trained).

Three tasks:

* **noisy-context QA** (:func:`evaluate_noisy_qa`): each held-out question is shown with its gold document among
  ``round(1 / (1 - r)) - 1`` distractors for every noise ratio ``r`` (default 0, 0.5, 0.8, 0.9). Examples and
  distractor draws come from seeded generators, so every model sees exactly the same prompts. Answers are generated
  greedily, batched with left padding, through the model's own ``generate`` (KV cache). Three scores per answer:

  - ``exact_match``: SQuAD exact match after :func:`normalize_text`;
  - ``f1``: SQuAD token F1 after :func:`normalize_text`;
  - ``lenient``: the normalised gold answer is a substring of the normalised prediction -- the "accuracy" used by the
    OpAmp authors (and by Liu et al.'s *Lost in the Middle* evaluation they follow). It forgives verbose answers, so
    it is reported separately and always labelled ``lenient``; never compare it with another paper's exact match.

* **needle retrieval** (:func:`evaluate_needle`): the pass-key test (Mohtashami & Jaggi, 2023) on a grid of context
  length x needle depth (0 = start of the haystack, 1 = end), exact match of the 5-digit key.

* **perplexity** (:func:`evaluate_perplexity`): ``exp`` of the mean next-token negative log-likelihood over every
  predicted token of held-out texts (each text is scored from its own start; longer texts are cut into windows of
  ``max_length`` tokens with no overlap).

:class:`EvalResults` gathers the results of one model; :func:`write_results` writes any number of them as JSON and as
one long CSV table (one row per model x task x setting x metric).
"""

from __future__ import annotations

import csv
import json
import math
import re
import string
import warnings
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import StoppingCriteria, StoppingCriteriaList

from .data.examples import ChatExample, Example, NoisyExample, noisy_examples
from .data.formatting import DEFAULT_FORMAT, PromptFormat, collate, encode_for_training, format_context
from .data.loading import DataFormatError, iter_json_records, load_examples
from .data.retrieval import squad_normalize
from .data.synthetic import SyntheticQA
from .data.tokenizer import warn_unknown_tokens
from .progress import ProgressArg, make_progress

DEFAULT_NOISE_RATIOS = (0.0, 0.5, 0.8, 0.9)
DEFAULT_CONTEXT_LENGTHS = (64, 128, 256)
DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)

# -- metrics (SQuAD v1.1 evaluation script, plus digit joining) -----------------------------------------------

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_DIGIT_GAP = re.compile(r"(?<=\d) (?=\d)")
_PUNCT = set(string.punctuation)


def normalize_text(text: str) -> str:
    """SQuAD answer normalisation: lower case, punctuation removed, articles (a/an/the) removed, single spaces.

    One addition: digits separated by single spaces are joined (``"7 3 9 1 4"`` -> ``"73914"``), because the embedded
    word-level tokenizer decodes numbers digit by digit; it is applied to gold and prediction alike.
    """
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    text = " ".join(_ARTICLES.sub(" ", text).split())
    return _DIGIT_GAP.sub("", text)


def _golds(gold: str | Sequence[str]) -> list[str]:
    golds = [gold] if isinstance(gold, str) else list(gold)
    if not golds:
        raise ValueError("at least one gold answer is needed")
    return golds


def exact_match(prediction: str, gold: str | Sequence[str]) -> float:
    """1.0 when the normalised prediction equals a normalised gold answer (SQuAD EM; max over several golds)."""
    p = normalize_text(prediction)
    return float(any(p == normalize_text(g) for g in _golds(gold)))


def token_f1(prediction: str, gold: str | Sequence[str]) -> float:
    """SQuAD token F1 between the normalised texts (max over several golds).

    Both empty scores 1, one empty scores 0 (the SQuAD 2.0 convention for answers that normalise to nothing).
    """
    best = 0.0
    p_tokens = normalize_text(prediction).split()
    for g in _golds(gold):
        g_tokens = normalize_text(g).split()
        if not p_tokens or not g_tokens:
            best = max(best, float(p_tokens == g_tokens))
            continue
        same = sum((Counter(p_tokens) & Counter(g_tokens)).values())
        if same == 0:
            continue
        precision, recall = same / len(p_tokens), same / len(g_tokens)
        best = max(best, 2 * precision * recall / (precision + recall))
    return best


def lenient_match(prediction: str, gold: str | Sequence[str]) -> float:
    """1.0 when a normalised gold answer is contained in the normalised prediction (plain substring test, as in the
    OpAmp / *Lost in the Middle* evaluation code). Reported separately from exact match, labelled ``lenient``."""
    p = normalize_text(prediction)
    return float(any((ng := normalize_text(g)) != "" and ng in p for g in _golds(gold)))


def best_subspan_em(prediction: str, gold: str | Sequence[str]) -> float:
    """Best-subspan exact match, the metric of "Lost in the Middle" (Liu et al., TACL 2024, arXiv:2307.03172): 1.0
    when any gold answer, SQuAD-normalised (lower case, no punctuation, no articles, single spaces; digits are *not*
    joined here, unlike :func:`normalize_text`), occurs inside the SQuAD-normalised prediction. The primary metric
    for retrieval QA (NaturalQuestions), where a chat model answers in a sentence."""
    p = squad_normalize(prediction)
    return float(any((ng := squad_normalize(g)) != "" and ng in p for g in _golds(gold)))


METRICS = {"exact_match": exact_match, "f1": token_f1, "lenient": lenient_match, "best_subspan_em": best_subspan_em}


# -- results ------------------------------------------------------------------------------------------------------


@dataclass
class Prediction:
    """One generated answer and its scores."""

    index: int  # position of the example in the evaluated list
    question: str
    answer: str
    prediction: str
    exact_match: float
    f1: float
    lenient: float
    dropped_distractors: int = 0
    best_subspan_em: float | None = None  # None in results written before the metric existed
    answers: list[str] = field(default_factory=list)  # every accepted answer (``answer`` is the first)


@dataclass
class QAResult:
    """Noisy-context QA at one noise ratio (``None``: the contexts of a user file, as given)."""

    noise_ratio: float | None
    n: int
    exact_match: float
    f1: float
    lenient: float
    predictions: list[Prediction] = field(default_factory=list)
    best_subspan_em: float | None = None  # None in results written before the metric existed


@dataclass
class NeedleCell:
    """Pass-key retrieval at one (context length, depth) cell."""

    context_len: int
    depth: float
    n: int
    exact_match: float
    predictions: list[Prediction] = field(default_factory=list)


@dataclass
class PerplexityResult:
    """Perplexity over held-out texts: ``exp(nll / tokens)``."""

    perplexity: float
    nll: float  # summed negative log-likelihood (nats)
    tokens: int  # number of predicted tokens
    texts: int


@dataclass
class EvalResults:
    """Everything measured for one model (``label`` names it in tables and plots; ``seed`` tells repeated runs apart,
    which the plots turn into error bars)."""

    label: str
    seed: int = 0
    qa: list[QAResult] = field(default_factory=list)
    needle: list[NeedleCell] = field(default_factory=list)
    perplexity: PerplexityResult | None = None
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self, predictions: bool = True) -> dict[str, Any]:
        d = asdict(self)
        if not predictions:
            for part in (*d["qa"], *d["needle"]):
                part.pop("predictions", None)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EvalResults:
        qa = [QAResult(**{**q, "predictions": [Prediction(**p) for p in q.get("predictions", [])]}) for q in d["qa"]]
        needle = [NeedleCell(**{**c, "predictions": [Prediction(**p) for p in c.get("predictions", [])]})
                  for c in d["needle"]]
        ppl = PerplexityResult(**d["perplexity"]) if d.get("perplexity") else None
        return cls(label=d["label"], seed=d.get("seed", 0), qa=qa, needle=needle, perplexity=ppl,
                   settings=d.get("settings", {}))

    def rows(self) -> list[dict[str, Any]]:
        """Long-format rows: ``label, seed, task, noise_ratio, context_len, depth, metric, value, n``."""
        base = {"label": self.label, "seed": self.seed}
        out: list[dict[str, Any]] = []
        for q in self.qa:
            for m in METRICS:
                if getattr(q, m) is None:
                    continue
                out.append({**base, "task": "noisy-qa", "noise_ratio": q.noise_ratio, "context_len": None,
                            "depth": None, "metric": m, "value": getattr(q, m), "n": q.n})
        for c in self.needle:
            out.append({**base, "task": "needle", "noise_ratio": None, "context_len": c.context_len,
                        "depth": c.depth, "metric": "exact_match", "value": c.exact_match, "n": c.n})
        if self.perplexity is not None:
            out.append({**base, "task": "ppl", "noise_ratio": None, "context_len": None, "depth": None,
                        "metric": "perplexity", "value": self.perplexity.perplexity, "n": self.perplexity.tokens})
        return out


CSV_FIELDS = ("label", "seed", "task", "noise_ratio", "context_len", "depth", "metric", "value", "n")


def write_results(results: EvalResults | Sequence[EvalResults], out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``results.json`` (everything, predictions included) and ``results.csv`` (one row per metric) into
    ``out_dir``; returns both paths."""
    items = [results] if isinstance(results, EvalResults) else list(results)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, csv_path = out / "results.json", out / "results.csv"
    json_path.write_text(json.dumps([r.to_dict() for r in items], indent=2) + "\n")
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for r in items:
            for row in r.rows():
                writer.writerow({k: "" if v is None else v for k, v in row.items()})
    return json_path, csv_path


def read_results(path: str | Path) -> list[EvalResults]:
    """Read a ``results.json`` written by :func:`write_results` (a file or the folder holding it)."""
    p = Path(path)
    if p.is_dir():
        p = p / "results.json"
    return [EvalResults.from_dict(d) for d in json.loads(p.read_text())]


# -- generation ---------------------------------------------------------------------------------------------------


def _device(model: nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def eos_token_ids(model: nn.Module, tokenizer: Any) -> list[int]:
    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None) if gen is not None else None
    if eos is None:
        eos = tokenizer.eos_token_id
    ids = [eos] if isinstance(eos, int) else list(eos or [])
    if not ids:
        raise ValueError("neither the model's generation config nor the tokenizer defines an EOS token")
    return ids


def _pad_id(tokenizer: Any, eos: list[int]) -> int:
    pad = tokenizer.pad_token_id
    return int(pad) if pad is not None else eos[0]


def answer_line_ended(tokenizer: Any, new_ids: Sequence[int]) -> bool:
    """Whether generated ``new_ids`` hold a line break after some non-blank text (the answer line is over)."""
    return "\n" in tokenizer.decode(list(new_ids), skip_special_tokens=True).lstrip()


class AnswerLineEnded(StoppingCriteria):
    """Stops a row once its generated text has a line break after some non-blank text (the answer line is over).

    Leading blank lines do not count (some chat models start their turn with one); the row's text up to the break is
    what ``generate_answers(first_line=True)`` keeps anyway, so stopping there changes no answer, only the cost.
    """

    def __init__(self, tokenizer: Any, prompt_length: int) -> None:
        self.tokenizer = tokenizer
        self.prompt_length = prompt_length

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        done = [answer_line_ended(self.tokenizer, row[self.prompt_length:]) for row in input_ids.tolist()]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def answer_text(tokenizer: Any, ids: Sequence[int], eos: Sequence[int], first_line: bool = True) -> str:
    """The answer in generated token ids: up to the first EOS, and with ``first_line`` the first non-blank line."""
    cut = next((j for j, t in enumerate(ids) if t in eos), len(ids))
    text = tokenizer.decode(list(ids[:cut]), skip_special_tokens=True)
    if first_line:
        text = text.strip().split("\n", 1)[0] if text.strip() else ""
    return str(text).strip()


def generate_answers(
    model: nn.Module,
    tokenizer: Any,
    examples: Sequence[Example],
    *,
    batch_size: int = 16,
    max_new_tokens: int = 16,
    max_length: int | None = None,
    fmt: PromptFormat = DEFAULT_FORMAT,
    first_line: bool = True,
) -> list[tuple[str, int]]:
    """Greedy answers to ``examples`` -> ``[(answer text, dropped distractors), ...]`` in input order.

    Prompts are formatted as for training (``encode_for_training``: the tokenizer's chat template if it has one, else
    ``fmt``), batched with left padding and decoded with the model's ``generate`` (greedy, KV cache). Generation stops
    at EOS; with ``first_line`` only the text before the first line break counts (a base model tends to go on with
    the next "Question:"). ``max_length`` (prompt + gold answer tokens) drops distractors as training does.
    Prompts are sorted by length so a batch wastes little compute on padding.
    """
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError("batch_size and max_new_tokens must be >= 1")
    eos = eos_token_ids(model, tokenizer)
    pad = _pad_id(tokenizer, eos)
    encoded = [encode_for_training(ex, tokenizer, max_length, fmt=fmt) for ex in examples]
    prompts = [{"input_ids": e.input_ids[: e.prompt_length]} for e in encoded]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]["input_ids"]))
    texts: list[str] = [""] * len(prompts)
    device = _device(model)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            batch = collate([prompts[i] for i in idx], pad, padding_side="left")
            extra: dict[str, Any] = {}
            if first_line:  # nothing after the answer line counts: stop there instead of paying for it
                extra["stopping_criteria"] = StoppingCriteriaList(
                    [AnswerLineEnded(tokenizer, batch["input_ids"].shape[1])])
            with torch.no_grad():
                out = model.generate(  # type: ignore[operator]
                    input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                    max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, use_cache=True,
                    pad_token_id=pad, eos_token_id=eos, temperature=None, top_p=None, top_k=None, **extra,
                )
            new = out[:, batch["input_ids"].shape[1]:].tolist()
            for i, ids in zip(idx, new, strict=True):
                texts[i] = answer_text(tokenizer, ids, eos, first_line)
    finally:
        model.train(was_training)
    return [(t, e.dropped_distractors) for t, e in zip(texts, encoded, strict=True)]


def score_predictions(examples: Sequence[Example], answers: Sequence[tuple[str, int]]) -> list[Prediction]:
    """Score generated answers against the examples' gold answers with every metric of :data:`METRICS`."""
    out = []
    for i, (ex, (pred, dropped)) in enumerate(zip(examples, answers, strict=True)):
        question = ex.question if isinstance(ex, NoisyExample) else ex.messages[-2]["content"]
        golds = list(ex.answers) if isinstance(ex, NoisyExample) else [ex.answer]
        out.append(Prediction(
            index=i, question=question, answer=ex.answer, prediction=pred,
            exact_match=exact_match(pred, golds), f1=token_f1(pred, golds),
            lenient=lenient_match(pred, golds), dropped_distractors=dropped,
            best_subspan_em=best_subspan_em(pred, golds), answers=golds,
        ))
    return out


class EmptyAnswersWarning(UserWarning):
    """Every generated answer of a setting is empty: the scores are 0 because the model said nothing."""


def warn_if_empty(predictions: Sequence[Prediction], setting: str) -> None:
    """Warn when every prediction of ``setting`` is ``""`` (a broken adapter, or a model that ends its turn at once),
    which would otherwise read as a plain score of 0."""
    if predictions and all(not p.prediction.strip() for p in predictions):
        warnings.warn(
            f"{setting}: all {len(predictions)} answers are empty (the model ends its answer at once: EOS or a line "
            "break first). The scores say nothing about retrieval; check the model, the adapter and the prompt "
            "format (a chat model needs its chat template)", EmptyAnswersWarning, stacklevel=2,
        )


def example_texts(examples: Iterable[Example]) -> list[str]:
    """The texts of ``examples`` a model reads or writes: documents, question and answer, or chat contents."""
    out: list[str] = []
    for ex in examples:
        if isinstance(ex, NoisyExample):
            out += [*ex.documents, ex.question, ex.answer]
        else:
            out += [str(m["content"]) for m in ex.messages]
    return out


def qa_result(noise_ratio: float | None, predictions: list[Prediction]) -> QAResult:
    """The mean of every metric over ``predictions``."""
    return QAResult(
        noise_ratio=noise_ratio, n=len(predictions), predictions=predictions,
        **{m: _mean(getattr(p, m) for p in predictions) for m in METRICS},
    )


def _mean(xs: Iterable[float]) -> float:
    vals = list(xs)
    return sum(vals) / len(vals) if vals else float("nan")


# -- tasks --------------------------------------------------------------------------------------------------------


# Cost estimates of one setting for the ETA (roughly its prompt tokens): a noisy-QA example at ratio r holds about
# 1/(1-r) times the documents of a clean one (~60 tokens); a needle example is its haystack; a perplexity text is five
# documents, scored in one forward pass (no generation).
def _qa_weight(n: int, ratio: float | None) -> float:
    return max(n, 1) * 60.0 / (1.0 - (ratio or 0.0))


def _needle_weight(n: int, length: int) -> float:
    return max(n, 1) * float(length)


def _ppl_weight(n: int) -> float:
    return max(n, 1) * 60.0


def qa_examples(
    n: int = 100, *, seed: int = 0, data: str | Path | Sequence[Example] | None = None
) -> list[Example]:
    """The raw (noise-free) held-out examples: ``SyntheticQA(seed, split="test")`` or the first ``n`` of ``data``
    (a local file read with :func:`attndenoise.data.load_examples`, or examples in memory). ``n=0``: all of ``data``."""
    if data is None:
        return list(SyntheticQA(seed, split="test").examples(n))
    items = load_examples(data) if isinstance(data, str | Path) else list(data)
    if not items:
        raise ValueError("the evaluation data holds no examples")
    return items[:n] if n else items


def evaluate_noisy_qa(
    model: nn.Module,
    tokenizer: Any,
    *,
    noise_ratios: Sequence[float] | None = DEFAULT_NOISE_RATIOS,
    n: int = 100,
    seed: int = 0,
    data: str | Path | Sequence[Example] | None = None,
    batch_size: int = 16,
    max_new_tokens: int = 16,
    max_length: int | None = None,
    fmt: PromptFormat = DEFAULT_FORMAT,
    progress: ProgressArg = False,
) -> list[QAResult]:
    """Noisy-context QA accuracy at each noise ratio (module docstring).

    For each ratio the distractors are drawn by ``noisy_examples(raw, ratio, seed=seed)`` (the example's own
    distractors first, then other examples' documents), so any two models evaluated with the same ``seed`` and data
    see identical prompts. ``noise_ratios=None`` evaluates the contexts of ``data`` as given (also the only option
    for chat examples, which have no documents to add). ``progress``: ``True`` reports each finished ratio with the
    elapsed time and ETA on stderr (:mod:`attndenoise.progress`), or pass a shared ``Progress``; quiet by default.
    """
    raw = qa_examples(n, seed=seed, data=data)
    if not raw:
        raise ValueError(f"no examples to evaluate (n={n}); give n >= 1")
    warn_unknown_tokens(tokenizer, tokenizer(example_texts(raw), add_special_tokens=False)["input_ids"],
                        "evaluation data" if data is None or not isinstance(data, str | Path) else str(data))
    if noise_ratios is None:
        settings: list[tuple[float | None, list[Example]]] = [(None, raw)]
    else:
        chats = [i for i, ex in enumerate(raw) if isinstance(ex, ChatExample)]
        if chats:
            raise ValueError(
                f"{len(chats)} chat example(s) (first: index {chats[0]}) have no documents to add distractors to; "
                "evaluate them with noise_ratios=None (contexts as given)"
            )
        docs = [ex for ex in raw if isinstance(ex, NoisyExample)]
        settings = [(float(r), list(noisy_examples(docs, float(r), seed=seed))) for r in noise_ratios]
    results = []
    reporter, own = make_progress(progress, sum(_qa_weight(n, r) for r, _ in settings), "noisy-qa")
    try:
        for ratio, exs in settings:
            answers = generate_answers(model, tokenizer, exs, batch_size=batch_size, max_new_tokens=max_new_tokens,
                                       max_length=max_length, fmt=fmt)
            results.append(qa_result(ratio, score_predictions(exs, answers)))
            warn_if_empty(results[-1].predictions, "noisy-qa" + ("" if ratio is None else f" at noise {ratio:g}"))
            if reporter is not None:
                reporter.advance("noisy-qa " + ("as given" if ratio is None else f"noise {ratio:g}"),
                                 _qa_weight(n, ratio))
    finally:
        if own and reporter is not None:
            reporter.close()
    return results


def evaluate_needle(
    model: nn.Module,
    tokenizer: Any,
    *,
    context_lengths: Sequence[int] = DEFAULT_CONTEXT_LENGTHS,
    depths: Sequence[float] = DEFAULT_DEPTHS,
    n: int = 5,
    seed: int = 0,
    batch_size: int = 16,
    max_new_tokens: int = 12,
    progress: ProgressArg = False,
) -> list[NeedleCell]:
    """Pass-key exact match on the grid ``context_lengths x depths``, ``n`` keys per cell (seeds ``seed .. seed+n-1``,
    the same for every model). Context lengths count haystack tokens of the embedded tokenizer's pre-tokenizer.
    ``progress`` as in :func:`evaluate_noisy_qa` (one report per cell)."""
    cells = []
    total = sum(_needle_weight(n, int(length)) for length in context_lengths) * len(depths)
    reporter, own = make_progress(progress, total, "needle")
    try:
        for length in context_lengths:
            for depth in depths:
                exs: list[Example] = [SyntheticQA.needle(int(length), float(depth), seed=seed + i) for i in range(n)]
                preds = score_predictions(exs, generate_answers(
                    model, tokenizer, exs, batch_size=batch_size, max_new_tokens=max_new_tokens))
                warn_if_empty(preds, f"needle at length {int(length)}, depth {float(depth):g}")
                cells.append(NeedleCell(context_len=int(length), depth=float(depth), n=len(preds),
                                        exact_match=_mean(p.exact_match for p in preds), predictions=preds))
                if reporter is not None:
                    reporter.advance(f"needle length {int(length)} depth {float(depth):g}",
                                     _needle_weight(n, int(length)))
    finally:
        if own and reporter is not None:
            reporter.close()
    return cells


def held_out_texts(n: int = 32, *, seed: int = 0, documents: int = 5) -> list[str]:
    """Held-out plain text for perplexity: ``n`` texts of ``documents`` test-split documents each, in the numbered
    document layout of the prompts (the pretraining stream never draws from the test split)."""
    gen = SyntheticQA(seed, split="test")
    out = []
    for _ in range(n):
        docs = gen.documents(documents)
        text, _ = format_context(NoisyExample("-", tuple(docs), (0,), "-"))
        out.append(text.rsplit("\n\n", 1)[0])  # drop the placeholder question
    return out


def read_texts(path: str | Path) -> list[str]:
    """Texts from a local file: JSONL with a ``"text"`` field per line, or plain text (one text per non-empty line)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no such text file: {p}")
    if p.suffix.lower() in (".jsonl", ".ndjson"):
        texts = []
        # The data loader's line reader: bad UTF-8 or JSON name the line, as for QA data.
        for where, rec in iter_json_records(p):
            if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
                raise DataFormatError(f"{where}: expected an object with a string field 'text'")
            texts.append(rec["text"])
    else:
        try:
            content = p.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise DataFormatError(f"{p.name}: not valid UTF-8 (byte {e.start})") from None
        texts = [line for line in content.splitlines() if line.strip()]
    if not texts:
        raise DataFormatError(f"{p.name}: no texts (give one text per line, or JSONL with a 'text' field)")
    return texts


def evaluate_perplexity(
    model: nn.Module,
    tokenizer: Any,
    texts: Sequence[str] | None = None,
    *,
    n: int = 32,
    seed: int = 0,
    batch_size: int = 8,
    max_length: int | None = None,
) -> PerplexityResult:
    """Perplexity ``exp(sum NLL / predicted tokens)`` of ``texts`` (default :func:`held_out_texts`).

    Each text is tokenized with the tokenizer's special tokens and cut into windows of ``max_length`` tokens (default
    the model's ``max_position_embeddings``); the first token of every window is context only, every later one is
    predicted. Padding never enters the sum.
    """
    texts = list(held_out_texts(n, seed=seed) if texts is None else texts)
    if not texts:
        raise ValueError("no texts to score")
    limit = max_length or int(getattr(getattr(model, "config", None), "max_position_embeddings", 0) or 2048)
    windows: list[list[int]] = []
    for t in texts:
        tids = list(tokenizer(t)["input_ids"])
        windows += [tids[i:i + limit] for i in range(0, len(tids), limit) if len(tids[i:i + limit]) > 1]
    if not windows:
        raise ValueError("every text is shorter than two tokens: nothing to predict")
    pad = _pad_id(tokenizer, eos_token_ids(model, tokenizer))
    device = _device(model)
    nll, count = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(windows), batch_size):
            batch = collate([{"input_ids": w} for w in windows[start:start + batch_size]], pad)
            ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
            with torch.no_grad():
                logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            targets, valid = ids[:, 1:], mask[:, 1:].bool()
            ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
            nll += float(ce.view_as(targets)[valid].sum())
            count += int(valid.sum())
    finally:
        model.train(was_training)
    return PerplexityResult(perplexity=math.exp(nll / count), nll=nll, tokens=count, texts=len(texts))


def evaluate_model(
    model: nn.Module,
    tokenizer: Any,
    *,
    label: str = "model",
    tasks: Sequence[str] = ("noisy-qa", "needle", "ppl"),
    seed: int = 0,
    noise_ratios: Sequence[float] | None = DEFAULT_NOISE_RATIOS,
    n: int = 100,
    data: str | Path | Sequence[Example] | None = None,
    context_lengths: Sequence[int] = DEFAULT_CONTEXT_LENGTHS,
    depths: Sequence[float] = DEFAULT_DEPTHS,
    needle_n: int = 5,
    texts: Sequence[str] | None = None,
    batch_size: int = 16,
    max_new_tokens: int = 16,
    max_length: int | None = None,
    progress: ProgressArg = False,
) -> EvalResults:
    """Run the chosen ``tasks`` (``"noisy-qa"``, ``"needle"``, ``"ppl"``) on one model -> :class:`EvalResults`.

    ``progress``: ``True`` reports every finished setting (noise ratio, needle cell, perplexity) with elapsed time and
    ETA on stderr, a bar on a terminal (:mod:`attndenoise.progress`); a ``Progress`` shares one ETA over several
    models (the CLI's multi-run ``eval``). Quiet by default, as a library call should be."""
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown:
        raise ValueError(f"unknown task(s) {', '.join(unknown)}; accepted: {', '.join(TASKS)}")
    res = EvalResults(label=label, seed=seed, settings={
        "tasks": list(tasks), "noise_ratios": None if noise_ratios is None else [float(r) for r in noise_ratios],
        "n": n, "data": None if data is None or not isinstance(data, str | Path) else str(data),
        "context_lengths": [int(c) for c in context_lengths], "depths": [float(d) for d in depths],
        "needle_n": needle_n, "max_new_tokens": max_new_tokens, "decoding": "greedy",
    })
    reporter, own = make_progress(progress, evaluation_weight(
        tasks, noise_ratios=noise_ratios, n=n, context_lengths=context_lengths, depths=depths, needle_n=needle_n,
        texts=texts), label)
    try:
        if "noisy-qa" in tasks:
            res.qa = evaluate_noisy_qa(model, tokenizer, noise_ratios=noise_ratios, n=n, seed=seed, data=data,
                                       batch_size=batch_size, max_new_tokens=max_new_tokens, max_length=max_length,
                                       progress=reporter)
        if "needle" in tasks:
            res.needle = evaluate_needle(model, tokenizer, context_lengths=context_lengths, depths=depths,
                                         n=needle_n, seed=seed, batch_size=batch_size, progress=reporter)
        if "ppl" in tasks:
            res.perplexity = evaluate_perplexity(model, tokenizer, texts, n=n, seed=seed, max_length=max_length)
            if reporter is not None:
                reporter.advance("perplexity", _ppl_weight(n if texts is None else len(texts)))
    finally:
        if own and reporter is not None:
            reporter.close()
    return res


def evaluation_weight(
    tasks: Sequence[str],
    *,
    noise_ratios: Sequence[float] | None = DEFAULT_NOISE_RATIOS,
    n: int = 100,
    context_lengths: Sequence[int] = DEFAULT_CONTEXT_LENGTHS,
    depths: Sequence[float] = DEFAULT_DEPTHS,
    needle_n: int = 5,
    texts: Sequence[str] | None = None,
) -> float:
    """The cost estimate of :func:`evaluate_model` with these settings (the total its progress counts down), so that
    a caller evaluating several models can give them one shared ``Progress``."""
    total = 0.0
    if "noisy-qa" in tasks:
        total += sum(_qa_weight(n, r) for r in (noise_ratios if noise_ratios is not None else [None]))
    if "needle" in tasks:
        total += sum(_needle_weight(needle_n, int(c)) for c in context_lengths) * len(depths)
    if "ppl" in tasks:
        total += _ppl_weight(n if texts is None else len(texts))
    return total


TASKS = ("noisy-qa", "needle", "ppl")

__all__ = [
    "evaluate_model", "evaluate_noisy_qa", "evaluate_needle", "evaluate_perplexity", "generate_answers",
    "score_predictions", "qa_examples", "EmptyAnswersWarning", "warn_if_empty", "example_texts",
    "held_out_texts", "read_texts", "normalize_text", "exact_match", "token_f1",
    "lenient_match", "METRICS", "Prediction", "QAResult", "NeedleCell", "PerplexityResult", "EvalResults",
    "write_results", "read_results", "evaluation_weight",
    "TASKS", "DEFAULT_NOISE_RATIOS", "DEFAULT_CONTEXT_LENGTHS", "DEFAULT_DEPTHS",
]
