"""The fine-tuning study behind ``attndenoise study``: each method in its paper's training protocol against that
protocol's own baseline, on a real model with real retrieval noise.

Protocols (a row is one trained model; its baseline is the same training without the method):

* ``attention`` -- the method and the patched layers' attention projections train together, as in "Differential
  Attention Adapters" style fine-tuning of the DAA / DiffQ / DiffK / DiffV / DEX paper (its appendix D: only the
  attention modules train); rows ``<method>+attn``, baseline ``none`` (the projections alone);
* ``lora`` -- the method trains beside a LoRA on the projections, as the OpAmp paper trains its adapters with
  (Q)LoRA ("Attention Reveals More Than Tokens"/OpAmp, arXiv:2502.15520 style); rows ``<method>+lora``, baseline
  ``lora``;
* ``alone`` -- only the method's own parameters train; rows ``<method>``, baseline ``lora~<method>``, a LoRA whose
  rank gives about the method's trainable-parameter count.

The budget on a 2-core CPU is met with three documented choices: only the top ``top_layers`` decoder layers are
patched and trained (the papers patch all), the frozen layers below run once per training example and once per
test prompt for every compared model together (``attndenoise.frozen``: exact, not an approximation), and training
contexts have fewer distractors than the noisiest test contexts. The learning rate of each protocol and the lambda
schedule are chosen on the validation split by the answer tokens' mean negative log-likelihood (seed 0); the test
split is read only for the final numbers: best-subspan EM against 0 / 4 / 19 hard distractors and against the
gold passage's position (first / middle / last) among 9, attention to the gold passage in the trained layers, and
pass-key retrieval (forgetting).

Everything is resumable: each training run lives in ``out/runs/<name>`` (reused once finished), the validation
scores in ``out/selection.json``, and each test prompt's answers for every model in ``out/eval/<setting>/``, so an
interrupted study loses at most one prompt's work, and adding a row evaluates only that row.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import registry
from . import stats as _stats

ATTENTION_METHODS = ("daa", "diffq", "diffk", "diffv", "dex", "diff", "dint", "lowrank_dint")
#: each method in the protocol its paper used, and the two baselines (``--rows papers``)
PAPER_ROWS: tuple[str, ...] = ("none", "lora", *(f"{m}+attn" for m in ATTENTION_METHODS), "opamp+lora")
#: the default on a 2-core CPU (150 minutes): one method of each paper in its protocol, and the two baselines --
#: DAA for the DAA / DiffQ / DiffK / DiffV / DEX paper, the DIFF retrofit, DINT, OpAmp with LoRA
DEFAULT_ROWS: tuple[str, ...] = ("none", "lora", "daa+attn", "diff+attn", "dint+attn", "opamp+lora")
#: learning rates tried per protocol on validation (the baseline of the protocol decides). Centred on what the
#: validation split chose for SmolLM2-135M on NQ when the grids started 10x lower (attention 9e-4, LoRA 3e-3, both
#: inside their extended grids); a best value at a grid's top edge still extends it upwards.
LR_GRID: dict[str, tuple[float, ...]] = {"attention": (3e-4, 9e-4, 2.7e-3), "lora": (1e-3, 3e-3, 9e-3),
                                         "alone": (3e-4, 1e-3, 3e-3)}
SCHEDULES = ("paper", "linear")
#: how many times a learning-rate grid is extended upwards (x3) when its best value is its largest
EXTEND_LR = 2
#: test settings: (name, hard distractors, gold position)
TEST_SETTINGS: tuple[tuple[str, int, str], ...] = (
    ("k0", 0, "random"), ("k4", 4, "random"), ("k9-first", 9, "first"), ("k9-middle", 9, "middle"),
    ("k9-last", 9, "last"), ("k19", 19, "random"))
BASE = "base"


class StudyError(ValueError):
    """A bad study setting; the message names it and what is accepted."""


trainable_methods = registry.trainable_methods


def full_rows() -> tuple[str, ...]:
    """Every trainable method in every protocol, with each protocol's baseline (``--full``)."""
    ms = trainable_methods()
    return ("none", "lora", *(f"{m}+attn" for m in ms), *(f"{m}+lora" for m in ms),
            *(r for m in ms for r in (m, f"lora~{m}")))


#: named row sets accepted by ``--rows``
ROW_SETS: dict[str, Callable[[], tuple[str, ...]]] = {
    "default": lambda: DEFAULT_ROWS, "papers": lambda: PAPER_ROWS, "full": full_rows}


def expand_rows(labels: Sequence[str]) -> tuple[str, ...]:
    """Row labels with the named sets (``default``, ``papers``, ``full``) replaced by their rows, duplicates
    dropped in order."""
    out: list[str] = []
    for label in labels:
        for r in ROW_SETS[label]() if label in ROW_SETS else (label,):
            if r not in out:
                out.append(r)
    return tuple(out)


@dataclass(frozen=True)
class Row:
    """One trained model of the study."""

    label: str
    method: str  # a registered method, "none" or "lora"
    protocol: str  # attention, lora, alone
    baseline: str | None  # the label of its protocol's baseline; None for a baseline
    matched: str | None = None  # for lora~<method>: the method whose parameter count the LoRA matches


def parse_row(label: str) -> Row:
    """``none``, ``lora``, ``<method>+attn``, ``<method>+lora``, ``<method>`` or ``lora~<method>``."""
    methods = trainable_methods()
    if label == "none":
        return Row(label, "none", "attention", None)
    if label == "lora":
        return Row(label, "lora", "lora", None)
    if label.startswith("lora~") and label[5:] in methods:
        return Row(label, "lora", "alone", None, matched=label[5:])
    for suffix, protocol, baseline in (("+attn", "attention", "none"), ("+lora", "lora", "lora")):
        if label.endswith(suffix) and label[: -len(suffix)] in methods:
            return Row(label, label[: -len(suffix)], protocol, baseline)
    if label in methods:
        return Row(label, label, "alone", f"lora~{label}")
    raise StudyError(f"unknown row {label!r}; accepted: none, lora, <method>+attn, <method>+lora, <method>, "
                     f"lora~<method> with <method> one of {', '.join(methods)}")


@dataclass
class StudyConfig:
    """Every setting of a study (recorded in ``results.json``; a changed setting retrains only what it touches)."""

    data: str
    out: str = "study-out"
    model: str = "smollm2-135m"
    rows: tuple[str, ...] = DEFAULT_ROWS
    seeds: tuple[int, ...] = (0, 1)
    top_layers: int = 4  # 0: every layer (no frozen prefix)
    steps: int = 150
    batch_size: int = 1
    train_distractors: int = 4
    max_length: int = 1024
    lora_rank: int = 8
    lr_grid: dict[str, tuple[float, ...]] = field(default_factory=lambda: dict(LR_GRID))
    schedules: tuple[str, ...] = SCHEDULES
    val_n: int = 100
    n: int = 32
    settings: tuple[tuple[str, int, str], ...] = TEST_SETTINGS
    attention_n: int = 16
    needle_length: int = 256
    needle_n: int = 6
    max_new_tokens: int = 24
    dtype: str = "float32"
    threads: int | None = None
    progress: bool = True

    def validate(self) -> None:
        if not Path(self.data).is_file():
            raise StudyError(f"--data {self.data}: no such file (give the .jsonl / .jsonl.gz of question / answers / "
                             "ctxs records, e.g. nq-open-oracle.jsonl.gz)")
        if not self.rows:
            raise StudyError("--rows: give at least one row")
        for r in self.rows:
            parse_row(r)
        if not self.seeds or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in self.seeds):
            raise StudyError(f"--seeds {self.seeds!r}: give integers >= 0")
        if isinstance(self.top_layers, bool) or not isinstance(self.top_layers, int) or self.top_layers < 0:
            raise StudyError(f"--top-layers {self.top_layers!r}: an integer >= 0 (0: every layer)")
        for name in ("steps", "batch_size", "max_length", "lora_rank", "val_n", "n"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise StudyError(f"--{name.replace('_', '-')} {v!r}: must be an integer >= 1")
        for name in ("train_distractors", "attention_n", "needle_n"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise StudyError(f"--{name.replace('_', '-')} {v!r}: must be an integer >= 0")
        bad = [s for s in self.schedules if s not in SCHEDULES]
        if bad or not self.schedules:
            raise StudyError(f"--schedules {list(self.schedules)}: choose from {', '.join(SCHEDULES)}")


def row_protocols(rows: Sequence[str]) -> dict[str, str]:
    """protocol -> the baseline label deciding its learning rate, for the protocols ``rows`` use."""
    out: dict[str, str] = {}
    for label in rows:
        r = parse_row(label)
        out.setdefault(r.protocol, r.baseline or r.label)
    return out


# -- the study ----------------------------------------------------------------------------------------------------


class Study:
    """State of one study run: the base model, the data splits and the trained runs."""

    def __init__(self, cfg: StudyConfig, log: Callable[[str], None]) -> None:
        from .data.retrieval import PassagePool, read_multidoc_qa, split_records
        from .frozen import FrozenPrefix
        from .io import base_signature
        from .models import load_model_and_tokenizer

        self.cfg, self.log = cfg, log
        self.out = Path(cfg.out)
        self.out.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        self.base, self.tok = load_model_and_tokenizer(cfg.model, dtype=getattr(torch, cfg.dtype))
        self.base.requires_grad_(False)
        self.load_seconds = time.perf_counter() - start
        self.stock = copy.deepcopy(self.base)  # the untouched copy every training run starts from
        self.records = read_multidoc_qa(Path(cfg.data))
        self.pool = PassagePool.from_records(self.records)
        self.val = split_records(self.records, "validation")[: cfg.val_n]
        self.test = split_records(self.records, "test")[: cfg.n]
        from .frozen import FrozenPrefixError, decoder_layers

        self.num_layers = len(decoder_layers(self.base))
        try:
            self.split = FrozenPrefix.top(self.base, cfg.top_layers) if cfg.top_layers else None
        except FrozenPrefixError as e:
            raise StudyError(str(e)) from None
        self.first = self.split.first if self.split is not None else 0
        self.signature = base_signature(self.base)
        self.timings: dict[str, float] = {}

    # -- training ------------------------------------------------------------------------------------------
    def train_config(self, row: Row, seed: int, lr: float, schedule: str | None, name: str) -> Any:
        from .train import TrainConfig

        cfg = self.cfg
        options: dict[str, Any] = {}
        if row.method in registry.METHODS and registry.config_class(row.method).uses_lambda_schedule and schedule:
            options["lambda_schedule"] = schedule
        rank = self.matched_rank(row.matched) if row.matched else cfg.lora_rank
        return TrainConfig(
            model=cfg.model, method=row.method, data=cfg.data, out=str(self.out / "runs" / name),
            method_options=options, steps=cfg.steps, learning_rate=lr, batch_size=cfg.batch_size,
            max_length=cfg.max_length, seed=seed, save_steps=max(1, cfg.steps // 3), split="train",
            distractors=cfg.train_distractors, distractor_kind="hard", prompt="litm",
            attention=row.protocol == "attention" and row.method != "none",
            lora=row.protocol == "lora" and row.method != "lora", lora_rank=rank, top_layers=cfg.top_layers or None,
            dtype=cfg.dtype, progress=False, logging_steps=10,
        )

    def matched_rank(self, method: str) -> int:
        """The LoRA rank whose parameter count on the trained layers' projections is nearest the method's."""
        from .train import matched_lora_rank

        return matched_lora_rank(self.stock, method, top=self.cfg.top_layers or None)

    def planned(self, row: Row, seed: int, lr: float, schedule: str | None, tag: str = "") -> Any:
        """The ``TrainConfig`` of one row's run; its folder name says row, seed, rate and schedule."""
        if not (row.method in registry.METHODS and registry.config_class(row.method).uses_lambda_schedule):
            schedule = None  # not a setting of this row: its name and config do not carry it
        name = f"{row.label}-s{seed}-lr{lr:g}{f'-{schedule}' if schedule else ''}{tag}"
        return self.train_config(row, seed, lr, schedule, name)

    def run(self, row: Row, seed: int, lr: float, schedule: str | None, tag: str = "") -> Path:
        """Train one row (or reuse its finished run) and return its run folder."""
        import warnings

        from .train import train

        tc = self.planned(row, seed, lr, schedule, tag)
        out = Path(tc.out)
        name = out.name
        if (out / "run.json").is_file():
            from .train import describe_diff, read_run, settings_diff

            diffs = settings_diff(read_run(out).get("config", {}), tc)
            if diffs:  # a reused run must be the run this study would train
                raise StudyError(f"{out} holds a run trained with other settings ({describe_diff(diffs, 'there')}); "
                                 "give the study another --out, or remove that run to retrain it")
            return out
        self.log(f"training {name}")
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # per-question skips and schedule notes: recorded in run.json instead
            train(tc, model=copy.deepcopy(self.stock), tokenizer=self.tok, resume=out.exists())
        self.timings[f"train {name}"] = time.perf_counter() - start
        return out

    def trained(self, run_dir: Path) -> nn.Module:
        """The trained model of a run, its LoRA merged, its frozen layers shared with the base (checked equal), and
        its embeddings and output head too when they were not trained (about 113 MB per model for SmolLM2's
        vocabulary; ``greedy_rows`` then finds the base's head by identity)."""
        from .frozen import decoder_layers, same_below, same_head
        from .train import load_trained

        model: Any = load_trained(copy.deepcopy(self.stock), run_dir)
        if hasattr(model, "merge_and_unload"):
            model = model.merge_and_unload()
        if not self.first:
            return model.eval()
        if not same_below(self.base, model, self.first):
            raise StudyError(f"{run_dir}: the trained model differs from the base below layer {self.first}")
        mine, shared = decoder_layers(model), decoder_layers(self.base)
        for i in range(self.first):
            mine[i] = shared[i]  # one copy of the frozen layers in memory for every compared model
        base: Any = self.base
        if same_head(model.get_output_embeddings(), base.get_output_embeddings()):
            # same_below checked the input embeddings equal; a tied pair stays tied (the base's two are one tensor)
            model.set_input_embeddings(base.get_input_embeddings())
            model.set_output_embeddings(base.get_output_embeddings())
        return model.eval()

    # -- validation ----------------------------------------------------------------------------------------
    def val_encoded(self) -> tuple[list[Any], list[Any]]:
        from .data.formatting import encode_for_training
        from .data.retrieval import LITM_FORMAT, multidoc_examples
        from .frozen import cached_hidden

        if not hasattr(self, "_val"):
            exs = multidoc_examples(self.val, self.cfg.train_distractors, "hard", "random", seed=0, pool=self.pool,
                                    skipped=[])
            enc = [encode_for_training(e, self.tok, self.cfg.max_length, fmt=LITM_FORMAT) for e in exs]
            hidden = (cached_hidden(self.split, [e.input_ids for e in enc], self.signature, progress=self.cfg.progress)
                      if self.split is not None else [None] * len(enc))
            self._val = (enc, hidden)
        return self._val

    @torch.no_grad()
    def answer_nll(self, model: nn.Module) -> float:
        """Mean negative log-likelihood of the gold answer tokens on the validation examples."""
        from .frozen import FrozenPrefix

        enc, hidden = self.val_encoded()
        split = FrozenPrefix(model, self.first) if self.first else None
        total, count = 0.0, 0
        for e, h in zip(enc, hidden, strict=True):
            labels = torch.tensor(e.labels[1:] + [-100])
            keep = (labels != -100).nonzero().squeeze(1)
            with split.replay(h[None]) if split is not None else contextlib.nullcontext():
                logits = model(input_ids=torch.tensor([e.input_ids]), logits_to_keep=keep).logits[0]
            total += float(torch.nn.functional.cross_entropy(logits.float(), labels[keep], reduction="sum"))
            count += len(keep)
        return total / max(1, count)

    def select(self) -> dict[str, Any]:
        """Learning rate per protocol (by its baseline) and the lambda schedule (by the first lambda method row),
        on validation with seed 0; cached in ``selection.json`` under a key of the settings involved."""
        from .train import jsonable, settings_diff

        path = self.out / "selection.json"
        saved = json.loads(path.read_text()) if path.is_file() else {}
        scores: dict[str, float] = saved.get("scores", {})
        # each score's training settings: a score is reused (without its run folder) only for the same settings
        settings: dict[str, dict[str, Any]] = saved.get("settings", {})

        def score(row: Row, lr: float, schedule: str | None) -> float:
            tc = self.planned(row, 0, lr, schedule)
            key = Path(tc.out).name
            if key in scores and key in settings and not settings_diff(settings[key], tc):
                return scores[key]
            run_dir = self.run(row, 0, lr, schedule)
            scores[key] = self.answer_nll(self.trained(run_dir))
            settings[key] = jsonable(tc.to_dict())
            _write_json(path, {"scores": scores, "settings": settings})
            self.log(f"validation {key}: answer NLL {scores[key]:.4f}")
            return scores[key]

        base_key = "base"
        if base_key not in scores:
            scores[base_key] = self.answer_nll(self.base)
        lrs: dict[str, float] = {}
        tried: dict[str, list[float]] = {}
        for protocol, baseline in row_protocols(self.cfg.rows).items():
            brow = parse_row(baseline)  # for "alone": the matched LoRA of the first method trained alone
            grid = list(self.cfg.lr_grid[protocol])
            while True:
                best = min(grid, key=lambda lr: (score(brow, lr, None), grid.index(lr)))  # noqa: B023
                # an optimum at the grid's top edge is not a choice: extend upwards (3x) at most twice
                if best != max(grid) or len(grid) >= len(self.cfg.lr_grid[protocol]) + EXTEND_LR:
                    break
                grid.append(float(f"{max(grid) * 3:.3g}"))
            lrs[protocol], tried[protocol] = best, grid
        schedule = None
        lam = [parse_row(r) for r in self.cfg.rows if parse_row(r).method in registry.METHODS
               and registry.config_class(parse_row(r).method).uses_lambda_schedule]
        if lam and len(self.cfg.schedules) > 1:
            r0 = lam[0]
            lr = lrs[r0.protocol]
            schedule = min(self.cfg.schedules, key=lambda s: (score(r0, lr, s), self.cfg.schedules.index(s)))
        elif lam:
            schedule = self.cfg.schedules[0]
        chosen = {"learning_rate": lrs, "lambda_schedule": schedule, "scores": scores, "settings": settings,
                  "decided_by": {p: b for p, b in row_protocols(self.cfg.rows).items()}, "lr_tried": tried,
                  "schedule_decided_by": lam[0].label if lam and len(self.cfg.schedules) > 1 else None}
        _write_json(path, chosen)
        return chosen

    # -- test ----------------------------------------------------------------------------------------------
    def test_examples(self, k: int, position: Any) -> list[Any]:
        from .data.retrieval import multidoc_examples

        return multidoc_examples(self.test, k, "hard" if k else "random", gold_position=position, seed=0,
                                 pool=self.pool)

    @torch.no_grad()
    def evaluate(self, models: dict[str, nn.Module], digests: dict[str, str],
                 advance: Callable[[str, bool, float], None]) -> dict[str, list[dict[str, Any]]]:
        """Every model's answer to every test prompt; one file per (setting, question) holds them all."""
        from transformers import StoppingCriteriaList

        from .data.formatting import encode_for_training
        from .data.retrieval import LITM_FORMAT
        from .evaluate import AnswerLineEnded, answer_line_ended, answer_text, eos_token_ids, score_predictions
        from .frozen import greedy_rows

        eos = eos_token_ids(self.base, self.tok)

        def line_ended(ids: list[int]) -> bool:
            return answer_line_ended(self.tok, ids)

        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else eos[0]
        results: dict[str, list[dict[str, Any]]] = {}
        for name, k, position in self.cfg.settings:
            folder = self.out / "eval" / name
            folder.mkdir(parents=True, exist_ok=True)
            rows_out: list[dict[str, Any]] = []
            for ex in self.test_examples(k, position):
                path = folder / f"{_digest(ex.question)}.json"
                saved = json.loads(path.read_text()) if path.is_file() else {"answers": {}}
                answers = saved["answers"]
                missing = [m for m in models if answers.get(m, {}).get("digest") != digests[m]]
                if missing:
                    enc = encode_for_training(ex, self.tok, fmt=LITM_FORMAT)
                    prompt = torch.tensor([enc.input_ids[: enc.prompt_length]])
                    start = time.perf_counter()
                    if self.first:  # the rows share the frozen layers: decode them together (greedy_rows)
                        new = greedy_rows(self.base, {m: models[m] for m in missing}, prompt, self.first,
                                          max_new_tokens=self.cfg.max_new_tokens, eos=eos, stop=line_ended)
                    else:  # every layer trained: each model generates alone
                        gen: dict[str, Any] = models
                        new = {m: gen[m].generate(
                            input_ids=prompt, attention_mask=torch.ones_like(prompt),
                            max_new_tokens=self.cfg.max_new_tokens, do_sample=False, num_beams=1,
                            eos_token_id=eos, pad_token_id=pad, temperature=None, top_p=None, top_k=None,
                            stopping_criteria=StoppingCriteriaList([AnswerLineEnded(self.tok, prompt.shape[1])]),
                        )[0, prompt.shape[1]:].tolist() for m in missing}
                    for m in missing:
                        text = answer_text(self.tok, new[m], eos)
                        pred = score_predictions([ex], [(text, 0)])[0]
                        answers[m] = {"digest": digests[m], "prediction": text,
                                      "best_subspan_em": pred.best_subspan_em, "exact_match": pred.exact_match,
                                      "f1": pred.f1}
                    _write_json(path, {"question": ex.question, "answers_gold": list(ex.answers),
                                       "prompt_tokens": enc.prompt_length, "answers": answers,
                                       "seconds": saved.get("seconds", 0.0) + time.perf_counter() - start})
                rows_out.append({"question": ex.question, "answers": {m: answers[m] for m in models}})
                advance(f"{name} question {len(rows_out)}/{len(self.test)}", bool(missing), _answer_cost(k))
            results[name] = rows_out
        return results

    def collect(self, models: dict[str, nn.Module], digests: dict[str, str]) -> dict[str, list[dict[str, Any]]]:
        """The saved answers of ``models`` for every setting and question (all evaluated by :meth:`evaluate`)."""
        out: dict[str, list[dict[str, Any]]] = {}
        for name, k, position in self.cfg.settings:
            rows = []
            for ex in self.test_examples(k, position):
                saved = json.loads((self.out / "eval" / name / f"{_digest(ex.question)}.json").read_text())
                stale = [m for m in models if saved["answers"].get(m, {}).get("digest") != digests[m]]
                if stale:
                    raise StudyError(f"{name}: no current answers of {', '.join(stale)}")  # pragma: no cover
                rows.append({"question": ex.question, "answers": {m: saved["answers"][m] for m in models}})
            out[name] = rows
        return out

    @torch.no_grad()
    def attention_to_gold(self, models: dict[str, nn.Module], include_base: bool = True) -> dict[str, dict[str, Any]]:
        """Share of the last prompt position's attention on the gold passage in each trained layer, mean over
        heads and the first ``attention_n`` prompts with 9 hard distractors, the gold in the middle."""
        from .data.formatting import encode_for_training
        from .data.retrieval import LITM_FORMAT
        from .families import attention_layers
        from .frozen import FrozenPrefix, cached_hidden
        from .measures import eager_maps, span_masks

        if not self.cfg.attention_n:
            return {}
        exs = self.test_examples(9, "middle")[: self.cfg.attention_n]
        enc = [encode_for_training(e, self.tok, fmt=LITM_FORMAT) for e in exs]
        prompts = [e.input_ids[: e.prompt_length] for e in enc]
        hidden = (cached_hidden(self.split, prompts, self.signature) if self.split is not None
                  else [None] * len(prompts))
        out: dict[str, dict[str, Any]] = {}
        for name, model in self._measured(models, include_base).items():
            layers = attention_layers(model)[self.first:]
            per: list[list[float]] = []
            uniform: list[float] = []
            for e, ids, h in zip(enc, prompts, hidden, strict=True):
                n = len(ids)
                gold, _ = span_masks(n, e.gold_spans, e.document_spans or None, n, torch.device("cpu"))
                got: dict[int, float] = {}

                def hook(i: int, gold: torch.Tensor = gold, got: dict[int, float] = got) -> Any:
                    def fn(mod: nn.Module, args: Any, output: Any) -> None:
                        w = output[1][0].float()  # (heads, queries, keys)
                        got[i] = float(w[:, -1, gold].sum(-1).mean())
                    return fn

                handles = [a.register_forward_hook(hook(i)) for i, (_, a) in enumerate(layers)]
                try:
                    replay: Any = (FrozenPrefix(model, self.first).replay(h[None]) if self.first and h is not None
                                   else contextlib.nullcontext())
                    with eager_maps(model), replay:
                        model(input_ids=torch.tensor([ids]), use_cache=False, logits_to_keep=1)
                finally:
                    for hd in handles:
                        hd.remove()
                per.append([got[i] for i in range(len(layers))])
                uniform.append(float(gold.sum()) / n)
            out[name] = {"layers": list(range(self.first, self.first + len(layers))),
                         "gold": [sum(p[i] for p in per) / len(per) for i in range(len(layers))],
                         "mean_gold": sum(sum(p) / len(p) for p in per) / len(per),
                         "uniform_gold": sum(uniform) / len(uniform), "n": len(per)}
        return out

    def _measured(self, models: dict[str, nn.Module], include_base: bool) -> dict[str, nn.Module]:
        """``models``, after the base when ``include_base``: what :meth:`attention_to_gold` and :meth:`needle` run."""
        return {**({BASE: self.base} if include_base else {}), **models}

    def cached_per_model(self, kind: str, models: dict[str, nn.Module], digests: dict[str, str],
                         measure: Callable[..., dict[str, Any]], settings: dict[str, Any]) -> dict[str, Any]:
        """``measure`` (:meth:`attention_to_gold` or :meth:`needle`) of the base and ``models``, each model measured
        once: results are kept in ``eval/<kind>.json`` under the model's run digest and ``settings``, so a resumed
        or grown study measures only the models it has not measured with these settings."""
        path = self.out / "eval" / f"{kind}.json"
        saved: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
        everything = {BASE: self.base, **models}

        def fresh(name: str) -> bool:
            entry = saved.get(name, {})
            return entry.get("digest") == digests[name] and entry.get("settings") == settings

        todo = {k: m for k, m in everything.items() if not fresh(k)}
        if todo:
            got = measure({k: m for k, m in todo.items() if k != BASE}, include_base=BASE in todo)
            for k, v in got.items():
                saved[k] = {"digest": digests[k], "settings": settings, "result": v}
            _write_json(path, saved)
        return {k: saved[k]["result"] for k in everything if k in saved}

    def needle(self, models: dict[str, nn.Module], include_base: bool = True) -> dict[str, float]:
        """Pass-key exact match per model (forgetting: the training data has no pass-key examples)."""
        from .evaluate import evaluate_needle

        if not self.cfg.needle_n:
            return {}
        out = {}
        for name, model in self._measured(models, include_base).items():
            cells = evaluate_needle(model, self.tok, context_lengths=(self.cfg.needle_length,),
                                    depths=(0.25, 0.75), n=self.cfg.needle_n, batch_size=4)
            # best-subspan EM: a chat model answers "The pass key is 95499." (EM 0, the key retrieved)
            preds = [p for c in cells for p in c.predictions]
            out[name] = sum(p.best_subspan_em or 0.0 for p in preds) / len(preds)
        return out


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _write_json(path: Path, obj: Any) -> None:
    from .io import atomic_write_json

    atomic_write_json(path, obj, indent=1)


def _run_digest(run_dir: Path) -> str:
    return hashlib.sha256((run_dir / "run.json").read_bytes()).hexdigest()[:16]


def run_study(cfg: StudyConfig, log: Callable[[str], None] = print) -> Path:
    """Select on validation, train every row and seed, evaluate on test, write the report into ``cfg.out``."""
    from .progress import Progress
    from .robustness import machine
    from .train import read_run

    cfg.validate()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    wall = time.perf_counter()
    study = Study(cfg, log)
    chosen = study.select()
    lrs, schedule = chosen["learning_rate"], chosen["lambda_schedule"]
    runs: dict[str, Path] = {}
    models: dict[str, nn.Module] = {}
    digests = {BASE: "base"}
    # Every row of every seed is trained first, then all of them answer each test prompt together: the base's
    # prefill of the frozen layers, and each decoding step's pass through them, are shared by every seed's rows.
    # Each answered question is saved at once, so an interrupted study resumes where it stopped.
    for seed in cfg.seeds:
        for label in cfg.rows:
            row = parse_row(label)
            key = f"{label}@{seed}"
            runs[key] = study.run(row, seed, lrs[row.protocol], schedule)
            models[key] = study.trained(runs[key])
            digests[key] = _run_digest(runs[key])
    total = sum(_answer_cost(k) for _, k, _ in cfg.settings) * len(study.test)
    reporter = Progress(total, "test answers") if cfg.progress else None
    start = time.perf_counter()
    study.evaluate({BASE: study.base, **models}, digests, _advancer(reporter))
    study.timings["test answers (this call)"] = time.perf_counter() - start
    answers = study.collect({BASE: study.base, **models}, digests)
    start = time.perf_counter()
    attention = study.cached_per_model("attention", models, digests, study.attention_to_gold,
                                       {"n": cfg.attention_n, "settings": "k9-middle"})
    study.timings["attention to gold"] = time.perf_counter() - start
    start = time.perf_counter()
    needle = study.cached_per_model("needle", models, digests, study.needle,
                                    {"n": cfg.needle_n, "length": cfg.needle_length})
    study.timings["needle"] = time.perf_counter() - start
    params, train_seconds = {}, {}
    for key, d in runs.items():
        run = read_run(d)
        params[key] = run.get("trainable_parameters")
        train_seconds[key] = run.get("seconds")
    meta = {"config": asdict(cfg), "machine": machine(), "load_average": os.getloadavg()[0],
            "wall_seconds": time.perf_counter() - wall, "selection": chosen, "timings": study.timings,
            "first_trained_layer": study.first, "num_layers": study.num_layers,
            "train_seconds": train_seconds, "trainable_parameters": params,
            "eval_seconds": _eval_seconds(Path(cfg.out), cfg.settings),
            "matched_ranks": {r: study.matched_rank(parse_row(r).matched or "") for r in cfg.rows
                              if parse_row(r).matched}}
    from .study_report import write_study_report

    return write_study_report(Path(cfg.out), answers, attention, needle, meta)


def _answer_cost(k: int) -> float:
    """The ETA's relative cost of answering one question with ``k`` distractors: ``1 + k / 4``. Decoding, nearly
    constant, dominates short prompts and the prefill grows with the passages; measured on SmolLM2 with the default
    rows (13 models, 2 threads), the seconds per question at k = 0, 4, 9, 19 were in the ratios 1 : 1.6 : 2.4 : 5.4
    (this rule: 1 : 2 : 3.25 : 5.75)."""
    return 1.0 + k / 4.0


def _advancer(reporter: Any) -> Callable[[str, bool, float], None]:
    """``advance(what, computed, cost)``: a question whose answers were all stored counts as done but not in the
    rate."""
    def advance(what: str, computed: bool, cost: float) -> None:
        if reporter is not None:
            reporter.advance(what, cost, timed=computed)
    return advance


def _eval_seconds(out: Path, settings: Sequence[tuple[str, int, str]]) -> float:
    total = 0.0
    for name, _, _ in settings:
        for p in (out / "eval" / name).glob("*.json"):
            total += float(json.loads(p.read_text()).get("seconds", 0.0))
    return total


mean_sd = _stats.mean_sd


__all__ = ["StudyConfig", "StudyError", "run_study", "parse_row", "DEFAULT_ROWS", "PAPER_ROWS", "full_rows",
           "expand_rows", "Row"]
