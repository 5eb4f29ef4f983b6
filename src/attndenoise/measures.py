"""Attention measures (docs/methods.md, section Attention measures): attention to gold and attention noise, per layer.

Definitions (made exact here):

* **The map.** In every layer, the map the layer *effectively* applies to the values: the method's combined map on
  the eager reference path (``A1 - lambda A2`` for DAA / DiffQ / DiffK / DEX / DIFF, the DINT / OpAmp / SRA map for
  those methods; :func:`attndenoise.reference_mode`), or the stock softmax map for a model without a method (the
  family's eager attention). Differential maps are **signed**; nothing is clipped or renormalised.
* **Query positions** (``query=``):

  - ``"last"`` (default): the last prompt position, i.e. the query whose output predicts the first answer token;
  - ``"answer"``: every answer-generating position with the gold answer teacher-forced: the last prompt position and
    each completion position except the final one (each predicts the next completion token). Values are averaged
    over these positions.
* **Mass.** For one head and one query row, the *mass* on a set of keys is the sum of the (signed) map entries over
  those keys. *Attention to gold* = mass on the gold-span keys (the gold documents' text tokens); *attention noise*
  = mass on every other context key: the text tokens of the non-gold documents (for an example without document
  spans, e.g. a chat example with a gold passage, every prompt key outside the gold span). Headers
  (``Document [i]:``), the question, BOS and the answer are in neither set. Both are averaged over query heads
  (then over query positions, then over examples) and reported per layer; :meth:`AttentionMeasures.mean` averages
  over a layer range.

The maps are taken from forward hooks on the attention modules and reduced to the query rows as each layer runs, so
at most one layer's map is alive at a time (the N x N maps exist only on this eager reference path).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from .data.examples import Example
from .data.formatting import DEFAULT_FORMAT, EncodedExample, PromptFormat, encode_for_training
from .families import attention_layers
from .patch import reference_mode, state_of

QueryMode = Literal["last", "answer"]
Span = tuple[int, int]


@dataclass
class AttentionMeasures:
    """Per-layer attention to gold and attention noise, averaged over heads, query positions and the ``n``
    examples measured. ``layers[i]`` is the layer index of ``gold[i]`` / ``noise[i]`` (every attention layer)."""

    gold: list[float]
    noise: list[float]
    layers: list[int]
    n: int = 1
    query: str = "last"
    per_example_gold: list[list[float]] = field(default_factory=list)

    def mean(self, layers: Sequence[int] | None = None) -> tuple[float, float]:
        """``(attention to gold, attention noise)`` averaged over ``layers`` (default all)."""
        chosen = list(self.layers) if layers is None else list(layers)
        missing = sorted(set(chosen) - set(self.layers))
        if missing:
            raise ValueError(f"layers {missing} were not measured (measured: {self.layers})")
        idx = [self.layers.index(i) for i in chosen]
        return (sum(self.gold[i] for i in idx) / len(idx), sum(self.noise[i] for i in idx) / len(idx))

    def to_dict(self) -> dict[str, Any]:
        g, nz = self.mean()
        return {"layers": self.layers, "gold": self.gold, "noise": self.noise, "n": self.n, "query": self.query,
                "mean_gold": g, "mean_noise": nz}


@contextlib.contextmanager
def eager_maps(model: nn.Module) -> Iterator[nn.Module]:
    """Make every attention layer of ``model`` return its explicit map (the eager reference path).

    A patched model enters :func:`attndenoise.reference_mode` (patched layers return the method's combined map,
    unpatched ones the family's eager map); a stock model is switched to the ``"eager"`` implementation and back.
    """
    # A peft wrapper (LoRA runs) holds the transformers model, which carries the method state.
    unwrap: Any = getattr(model, "get_base_model", None)
    base: nn.Module = unwrap() if callable(unwrap) else model
    if state_of(base) is not None:
        with reference_mode(base):
            yield model
        return
    config = getattr(model, "config", None)
    original = getattr(config, "_attn_implementation", None)
    switch: Any = getattr(model, "set_attn_implementation", None)
    if original == "eager" or switch is None:
        yield model
        return
    switch("eager")
    try:
        yield model
    finally:
        switch(original)


def span_masks(n: int, gold_spans: Sequence[Span], context_spans: Sequence[Span] | None, limit: int,
           device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean key masks (gold, noise) over ``n`` keys; ``limit`` = prompt length (noise never reaches past it)."""
    gold = torch.zeros(n, dtype=torch.bool, device=device)
    for s, e in gold_spans:
        if not 0 <= s < e <= n:
            raise ValueError(f"gold span ({s}, {e}) is outside the {n} input positions")
        gold[s:e] = True
    if not gold.any():
        raise ValueError("no gold span: attention to gold needs the gold document's token range")
    noise = torch.zeros(n, dtype=torch.bool, device=device)
    if context_spans:
        for s, e in context_spans:
            noise[s:e] = True
    else:
        noise[:limit] = True
    return gold, noise & ~gold


def measure_attention(
    model: nn.Module,
    input_ids: torch.Tensor | Sequence[int],
    gold_spans: Sequence[Span],
    context_spans: Sequence[Span] | None = None,
    query_positions: Sequence[int] | None = None,
    *,
    prompt_length: int | None = None,
    keep_maps: Sequence[int] = (),
) -> tuple[AttentionMeasures, dict[int, torch.Tensor]]:
    """The attention measures of one unpadded sequence (module docstring has the definitions).

    ``context_spans``: token ranges of every context document (gold included); ``None`` = every key before
    ``prompt_length`` is context. ``query_positions`` default to the last prompt position (``prompt_length - 1``,
    ``prompt_length`` defaulting to the whole sequence). ``keep_maps``: layer indices whose per-head map
    ``(H, N, N)`` (float32, CPU) is also returned, for plots.
    """
    ids = torch.as_tensor(input_ids, dtype=torch.long)
    if ids.dim() == 1:
        ids = ids[None]
    if ids.dim() != 2 or ids.shape[0] != 1:
        raise ValueError(f"measure_attention takes one sequence, got input_ids of shape {tuple(ids.shape)}")
    n = ids.shape[1]
    plen = n if prompt_length is None else prompt_length
    rows = [plen - 1] if query_positions is None else list(query_positions)
    if not rows or not all(0 <= r < n for r in rows):
        raise ValueError(f"query positions {rows} must lie in [0, {n})")
    device = next(model.parameters()).device
    gold_mask, noise_mask = span_masks(n, gold_spans, context_spans, plen, device)
    row_index = torch.tensor(rows, device=device)
    layers = attention_layers(model)
    gold: dict[int, float] = {}
    noise: dict[int, float] = {}
    kept: dict[int, torch.Tensor] = {}
    keep = set(keep_maps)

    def hook(i: int) -> Any:
        def fn(mod: nn.Module, args: Any, output: Any) -> None:
            weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
            if weights is None:
                raise RuntimeError(
                    f"attention layer {i} ({type(mod).__name__}) returned no attention map on the eager path"
                )
            w = weights[0].float()  # (H, Nq, Nk)
            if w.shape[-2] != n or w.shape[-1] != n:
                raise RuntimeError(f"layer {i}: expected an ({n}, {n}) map, got {tuple(w.shape[-2:])}")
            sel = w.index_select(1, row_index)  # (H, Q, N)
            # Mass = sum of the signed map over the key set; mean over heads and query positions.
            gold[i] = float(sel[..., gold_mask].sum(-1).mean())
            noise[i] = float(sel[..., noise_mask].sum(-1).mean())
            if i in keep:
                kept[i] = w.detach().cpu()
        return fn

    handles = [attn.register_forward_hook(hook(i)) for i, (_, attn) in enumerate(layers)]
    was_training = model.training
    model.eval()
    try:
        with eager_maps(model), torch.no_grad():
            model(input_ids=ids.to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    order = list(range(len(layers)))
    return AttentionMeasures(gold=[gold[i] for i in order], noise=[noise[i] for i in order], layers=order,
                             per_example_gold=[[gold[i] for i in order]]), kept


def _query_rows(enc: EncodedExample, query: QueryMode) -> list[int]:
    if query == "last":
        return [enc.prompt_length - 1]
    if query == "answer":
        return list(range(enc.prompt_length - 1, len(enc.input_ids) - 1))
    raise ValueError(f"query must be 'last' or 'answer', got {query!r}")


def example_attention(
    model: nn.Module,
    tokenizer: Any,
    example: Example | EncodedExample,
    *,
    query: QueryMode = "last",
    max_length: int | None = None,
    fmt: PromptFormat = DEFAULT_FORMAT,
    keep_maps: Sequence[int] = (),
) -> tuple[AttentionMeasures, dict[int, torch.Tensor], EncodedExample]:
    """The attention measures of one example, encoded as for training (so the gold span is known) ->
    ``(measures, kept maps, encoding)``. With ``query="last"`` only the prompt is run; with ``"answer"`` the gold
    completion too."""
    enc = example if isinstance(example, EncodedExample) else encode_for_training(example, tokenizer, max_length,
                                                                                   fmt=fmt)
    if not enc.gold_spans:
        raise ValueError("the example has no gold span (a chat example needs its 'gold' passage)")
    rows = _query_rows(enc, query)
    ids = enc.input_ids[: enc.prompt_length] if query == "last" else enc.input_ids
    m, kept = measure_attention(model, ids, enc.gold_spans, enc.document_spans or None, rows,
                                prompt_length=enc.prompt_length, keep_maps=keep_maps)
    m.query = query
    return m, kept, enc


def dataset_attention(
    model: nn.Module,
    tokenizer: Any,
    examples: Sequence[Example | EncodedExample],
    *,
    query: QueryMode = "last",
    max_length: int | None = None,
    fmt: PromptFormat = DEFAULT_FORMAT,
) -> AttentionMeasures:
    """The attention measures averaged over ``examples`` (each run alone, unpadded: padding would shift no measure, but
    one sequence at a time keeps the eager maps small)."""
    if not examples:
        raise ValueError("no examples to measure")
    per = [example_attention(model, tokenizer, ex, query=query, max_length=max_length, fmt=fmt)[0]
           for ex in examples]
    layers = per[0].layers
    k = len(per)
    return AttentionMeasures(
        gold=[sum(p.gold[i] for p in per) / k for i in range(len(layers))],
        noise=[sum(p.noise[i] for p in per) / k for i in range(len(layers))],
        layers=layers, n=k, query=query, per_example_gold=[p.gold for p in per],
    )


__all__ = ["AttentionMeasures", "measure_attention", "example_attention", "dataset_attention", "eager_maps"]
