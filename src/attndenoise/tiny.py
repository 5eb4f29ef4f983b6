"""The embedded tiny model: a small Llama pretrained on the synthetic tasks, built once and cached on disk.

Nothing can be downloaded where this runs, so the tool builds its own base model: a word-level tokenizer over the
synthetic vocabulary and a Llama-architecture model pretrained (seeded; bit-identical on the same machine and thread
count; a few minutes on a CPU, timings in docs/decisions.md, section tiny.py) on an induction drill first, then a mix
of plain documents, noisy-context QA with 0-1 distractors, the drill, and passkey retrieval. It is meant to answer
well from the gold document alone, to look documents up by the full name, and to be hurt by many similarly named
distractors, so that denoising methods have room to help. The result is an ordinary checkpoint directory::

    path = tiny_model_path()          # the shipped model (other settings: built on first use, then cached)
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)

The default model ships with the package (``assets/tiny-<hash>``, built by ``attndenoise build-tiny --threads 1``),
so ``tiny_model_path()`` normally returns that folder and builds nothing; other settings are built on first use.
The cache lives in ``$ATTNDENOISE_CACHE`` (default ``~/.cache/attndenoise``) under ``tiny-<hash>``, where the hash
covers every setting of ``TinyConfig`` and ``TINY_VERSION`` (bumped whenever the data or the training code changes
what gets built). A build writes into a temporary directory beside the cache entry and renames it into place under
a lock (``attndenoise.cache.cached_build``), so an interrupted build never leaves a half-written model behind and two
processes never build the same model twice.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel

from .cache import CACHE_ENV, cached_build, default_cache_dir  # noqa: F401  (re-exported)
from .data import build_tokenizer
from .data.examples import NoisyExample, build_noisy_example
from .data.formatting import DEFAULT_FORMAT, IGNORE_INDEX, collate, encode_for_training, format_context
from .data.synthetic import ATTRIBUTE_BY_NAME, DOCUMENT_STYLES, SyntheticQA

TINY_VERSION = 2
METADATA_FILE = "attndenoise_tiny.json"


@dataclass(frozen=True)
class TinyConfig:
    """Everything that determines the built model (all of it enters the cache hash).

    Model: a Llama with grouped-query attention (``num_key_value_heads < num_attention_heads``) and tied embeddings.
    Data: the first ``induction_steps`` batches are the repeat drill alone (a random word string, then the same
    string again, trained on the repeat); after that each training sequence is QA with probability ``mix_qa`` (``k``
    distractors with probability ``distractor_weights[k]``, ``questions_per_context`` questions about people of the
    context, trained on the answers), the repeat drill (``repeat_min_len..repeat_max_len`` words) with probability
    ``mix_repeat``, a passkey haystack of ``passkey_min_len..passkey_max_len`` tokens with probability
    ``mix_passkey``, else plain text: ``2..max_plain_documents`` documents about similar people, some restated at
    the end (passkey and plain text are trained on every token). Documents are written in ``document_style`` (see
    ``SyntheticQA``). The loss is averaged per sequence so that long sequences do not drown the answers.
    """

    # How the defaults were chosen, with the scores of the alternatives tried: docs/decisions.md, section tiny.py.
    hidden_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    intermediate_size: int = 384
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    steps: int = 2000
    batch_size: int = 32
    learning_rate: float = 1e-3
    warmup_steps: int = 60
    weight_decay: float = 0.01
    seed: int = 0
    attributes_per_document: int = 3
    share_name: float = 0.8
    document_style: str = "facts"
    questions_per_context: int = 3
    induction_steps: int = 700
    mix_qa: float = 0.6
    mix_repeat: float = 0.1
    mix_passkey: float = 0.1
    distractor_weights: tuple[float, ...] = (0.7, 0.3)
    repeat_min_len: int = 8
    repeat_max_len: int = 96
    passkey_min_len: int = 16
    passkey_max_len: int = 320
    max_plain_documents: int = 12

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("hidden_size must be a multiple of num_attention_heads")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        if self.steps < 0 or self.batch_size < 1:
            raise ValueError("steps must be >= 0 and batch_size >= 1")
        mixes = (self.mix_qa, self.mix_passkey, self.mix_repeat)
        if min(mixes) < 0 or sum(mixes) > 1:
            raise ValueError("mix_qa, mix_passkey and mix_repeat must be non-negative with a sum in [0, 1]")
        if not self.distractor_weights or min(self.distractor_weights) < 0 or sum(self.distractor_weights) <= 0:
            raise ValueError("distractor_weights must be non-negative with a positive sum")
        if self.document_style not in DOCUMENT_STYLES:
            raise ValueError(f"document_style must be one of {', '.join(DOCUMENT_STYLES)}, got {self.document_style!r}")
        if self.induction_steps < 0 or not 1 <= self.repeat_min_len <= self.repeat_max_len:
            raise ValueError("induction_steps must be >= 0 and 1 <= repeat_min_len <= repeat_max_len")

    def version_hash(self) -> str:
        """A short hash of the settings and ``TINY_VERSION``: the cache key."""
        payload = json.dumps({"version": TINY_VERSION, **dataclasses.asdict(self)}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:12]


#: Where the package keeps the default tiny model, built by this project's own `attndenoise build-tiny` (1 thread).
PACKAGED_DIR = Path(__file__).parent / "assets"


def packaged_model_path(config: TinyConfig | None = None) -> Path | None:
    """The shipped weights for ``config`` (default settings) if the package holds them, else ``None``.

    Shipping the default model means ``make demo``, ``eval`` and the tests never pay for the build (minutes on
    two cores, far more on a loaded machine) and give the same numbers on every machine; a build on another CPU or
    thread count would differ at float32 round-off.
    """
    path = PACKAGED_DIR / f"tiny-{(config or TinyConfig()).version_hash()}"
    return path if (path / METADATA_FILE).is_file() else None


def tiny_model_path(cache_dir: str | Path | None = None, *, threads: int | None = None, rebuild: bool = False,
                    **overrides: Any) -> Path:
    """The directory of the tiny model for these settings: the shipped one for the default settings, else the
    cached build, pretraining it first if it is not cached yet.

    ``overrides`` are ``TinyConfig`` fields (``steps=20, hidden_size=32`` gives a model built in seconds, for tests);
    ``threads`` is passed to ``pretrain_tiny``; ``rebuild=True`` ignores the shipped weights (and builds into the
    cache unless it holds the model already).
    """
    config = TinyConfig(**overrides)
    packaged = None if rebuild else packaged_model_path(config)
    if packaged is not None:
        return packaged
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return cached_build(root, f"tiny-{config.version_hash()}", METADATA_FILE,
                        lambda tmp: pretrain_tiny(tmp, config=config, threads=threads,
                                                  progress=build_progress(config.steps)))


def build_progress(total: int, every: float = 0.1) -> Callable[[int, float], None] | None:
    """A ``progress(step, loss)`` for ``pretrain_tiny`` that prints to stderr: a line at every ``every`` of the
    steps with the loss and an ETA (a build takes minutes, longer on a loaded machine; silence would look hung)."""
    if total <= 0:
        return None
    import sys

    start = time.perf_counter()
    marks = {max(1, round(total * f * every)) for f in range(1, int(1 / every) + 1)}

    def report(step: int, loss: float) -> None:
        if step == 1:
            print(f"building the tiny model ({total} steps) ...", file=sys.stderr, flush=True)
        if step in marks:
            elapsed = time.perf_counter() - start
            eta = elapsed / step * (total - step)
            print(f"  step {step}/{total}, loss {loss:.3f}, {elapsed:.0f} s elapsed, ETA {eta:.0f} s",
                  file=sys.stderr, flush=True)

    return report


@contextmanager
def _deterministic(threads: int) -> Iterator[None]:
    """Seeded-run settings, restored afterwards: a fixed thread count and deterministic ops (repeatable on one
    machine with one thread count; other thread counts split float32 sums differently)."""
    prev_threads = torch.get_num_threads()
    prev_det = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(prev_threads)
        torch.use_deterministic_algorithms(prev_det)


def build_model(config: TinyConfig, vocab_size: int, special: dict[str, Any]) -> PreTrainedModel:
    """A freshly initialised Llama of the configured size (seed the global generator first for reproducibility)."""
    cfg = LlamaConfig(
        vocab_size=vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads, max_position_embeddings=config.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta}, tie_word_embeddings=True,
        **special,
    )
    return LlamaForCausalLM(cfg)


class _Mixture:
    """The pretraining stream: seeded, so the same config always sees the same sequences."""

    def __init__(self, config: TinyConfig, tokenizer: Any) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.rng = random.Random(f"attndenoise-pretrain:{config.seed}")
        self.qa = SyntheticQA(config.seed, split="train", attributes_per_document=config.attributes_per_document,
                              share_name=config.share_name, document_style=config.document_style)
        # Word ids the repeat drill samples from: every word of the synthetic vocabulary, specials excluded.
        special = set(tokenizer.all_special_ids)
        self.words = [i for i in range(len(tokenizer)) if i not in special]
        self.max_k = len(config.distractor_weights) - 1

    def sequence(self) -> dict[str, list[int]]:
        c, r = self.config, self.rng
        u = r.random()
        if u < c.mix_qa:
            k = r.choices(range(self.max_k + 1), weights=c.distractor_weights)[0]
            raw = self.qa.example()
            ex = build_noisy_example(raw, 0.0, rng=r, num=k)
            feats = encode_for_training(ex, self.tokenizer).features()
            # Follow-up questions about people of the same context (gold or not): more answers to learn from per
            # context token. Each answer ends with EOS, which is where generation stops at evaluation.
            facts = raw.meta["facts"]
            asked = (raw.meta["entity"], raw.meta["attribute"])
            candidates = [(facts[d][0], a, v) for d in ex.documents for a, v in sorted(facts[d][1].items())]
            candidates = [x for x in candidates if x[:2] != asked]
            for name, attr_name, value in r.sample(candidates, min(c.questions_per_context - 1, len(candidates))):
                attr = ATTRIBUTE_BY_NAME[attr_name]
                fmt = DEFAULT_FORMAT
                q_text = "\n" + fmt.question.format(question=attr.question.format(name=name)) + fmt.answer_prefix
                q = self.tokenizer(q_text, add_special_tokens=False)
                a = self.tokenizer(fmt.answer.format(answer=value), add_special_tokens=False)
                q_ids, a_ids = list(q["input_ids"]), [*a["input_ids"], self.tokenizer.eos_token_id]
                feats["input_ids"] += q_ids + a_ids
                feats["attention_mask"] += [1] * (len(q_ids) + len(a_ids))
                feats["labels"] += [IGNORE_INDEX] * len(q_ids) + a_ids
            return feats
        if u < c.mix_qa + c.mix_repeat:
            return self.repeat()
        if u < c.mix_qa + c.mix_repeat + c.mix_passkey:
            # Every token is a target. The filler is a fixed cycle of five sentences (learnt as plain text); the pass
            # key, stated twice before the question, is the part only copying predicts. It is too sparse to grow
            # copying heads on its own (docs/decisions.md, section tiny.py): the repeat drill does that.
            length = r.randint(c.passkey_min_len, c.passkey_max_len)
            ex = SyntheticQA.needle(length, r.random(), seed=r.randrange(2**31))
            feats = encode_for_training(ex, self.tokenizer).features()
            feats["labels"] = list(feats["input_ids"])
            return feats
        # Plain text: documents about similar people, then some of them restated in another order; every token is a
        # target. A restated document is predictable only by finding the earlier one with the same full name, which
        # is the lookup QA needs (and similar names make half a name insufficient).
        docs = list(self.qa.example().documents)
        r.shuffle(docs)
        shown = docs[: r.randint(2, c.max_plain_documents)]
        again = r.sample(shown, r.randint(1, min(3, len(shown))))
        text, _ = format_context(NoisyExample("-", tuple(shown + again), (0,), "-"))
        text = text.rsplit("\n\n", 1)[0]  # drop the placeholder question
        ids = list(self.tokenizer(text)["input_ids"]) + [self.tokenizer.eos_token_id]
        return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": ids}

    def repeat(self) -> dict[str, list[int]]:
        """Induction drill: a random word string, then the same string again. Only the repeat is predictable, and
        only by finding the earlier occurrence of the current word and copying its successor: the match-and-copy
        circuit that document lookup is built from. Why it comes first and stays in the mixture: docs/decisions.md,
        section tiny.py."""
        c, r = self.config, self.rng
        n = r.randint(c.repeat_min_len, c.repeat_max_len)
        seq = [r.choice(self.words) for _ in range(n)]
        ids = [self.tokenizer.bos_token_id, *seq, *seq, self.tokenizer.eos_token_id]
        labels = [IGNORE_INDEX] * (n + 1) + ids[n + 1:]
        return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}

    def batches(self, pool_batches: int = 8) -> Iterator[dict[str, torch.Tensor]]:
        """Endless batches: ``induction_steps`` batches of the repeat drill alone, then the mixture. Sequences are
        drawn ``pool_batches`` batches at a time and grouped by length (then the batches shuffled), which roughly
        halves the compute spent on padding."""
        bs = self.config.batch_size
        for _ in range(self.config.induction_steps):
            yield collate([self.repeat() for _ in range(bs)], self.tokenizer.pad_token_id)
        while True:
            pool = sorted((self.sequence() for _ in range(bs * pool_batches)), key=lambda f: len(f["input_ids"]))
            groups = [pool[i:i + bs] for i in range(0, len(pool), bs)]
            self.rng.shuffle(groups)
            for group in groups:
                yield collate(group, self.tokenizer.pad_token_id)


def sequence_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy averaged over each sequence's targets, then over the batch."""
    logits, targets = logits[:, :-1].float(), labels[:, 1:]
    mask = targets != IGNORE_INDEX
    ce = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.clamp_min(0).reshape(-1), reduction="none")
    ce = (ce.view_as(targets) * mask).sum(1) / mask.sum(1).clamp_min(1)
    return ce[mask.any(1)].mean()


def pretrain_tiny(
    out_dir: str | Path,
    *,
    config: TinyConfig | None = None,
    progress: Callable[[int, float], None] | None = None,
    threads: int | None = None,
    **overrides: Any,
) -> Path:
    """Build the tokenizer, pretrain the tiny model and ``save_pretrained`` both into ``out_dir``.

    ``config`` (or ``TinyConfig`` fields as keyword arguments) sets size, steps and seed; ``progress(step, loss)`` is
    called after every optimizer step. ``threads`` (default: up to 2) changes speed (on an oversubscribed machine 1 is
    much faster, because a 2-thread op waits for its slower thread) and, through the order of float32 sums, the
    weights at round-off level (the tests allow 1e-5 of each tensor's scale after 3 steps; the thread count is not
    part of the cache hash). Writes ``attndenoise_tiny.json`` last (settings, hash, losses, wall time): its presence
    marks a complete build. Deterministic: the same settings and software on the same machine with the same thread
    count give bit-identical weights; another thread count or CPU model is not bit-identical.
    """
    if config is None:
        config = TinyConfig(**overrides)
    elif overrides:
        config = dataclasses.replace(config, **overrides)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    tokenizer = build_tokenizer(model_max_length=config.max_position_embeddings)
    special: dict[str, Any] = {"pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id,
               "eos_token_id": tokenizer.eos_token_id}
    losses: list[float] = []
    with _deterministic(threads or min(2, os.cpu_count() or 1)):
        torch.manual_seed(config.seed)
        model = build_model(config, len(tokenizer), special)
        model.train()
        decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
        no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=config.learning_rate, betas=(0.9, 0.98),
        )

        def lr_at(step: int) -> float:  # linear warm-up, cosine decay to 10%
            if step < config.warmup_steps:
                return (step + 1) / config.warmup_steps
            t = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
            return 0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, t)))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
        data = _Mixture(config, tokenizer).batches()
        for step in range(config.steps):
            batch = next(data)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            loss = sequence_loss(logits, batch["labels"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            losses.append(loss.item())
            if progress is not None:
                progress(step + 1, losses[-1])
    model.eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    window = max(1, min(50, len(losses) // 10))
    meta = {
        "tiny_version": TINY_VERSION,
        "hash": config.version_hash(),
        "config": dataclasses.asdict(config),
        "parameters": sum(p.numel() for p in model.parameters()),
        "loss_first": sum(losses[:window]) / window if losses else None,
        "loss_last": sum(losses[-window:]) / window if losses else None,
        "seconds": round(time.perf_counter() - start, 1),
        "torch": torch.__version__,
    }
    (out / METADATA_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return out
