"""Run the frozen lower layers of a causal LM once and reuse their output.

When only the top ``k`` decoder layers change (a method patched into them, their projections or a LoRA on them
trained), everything below is the same function for every training step, every epoch and every compared model.
:class:`FrozenPrefix` splits a model at its first changing decoder layer:

* :meth:`FrozenPrefix.capture` runs the model up to that layer and returns the hidden states entering it (the
  forward stops there, so the top layers cost nothing);
* :meth:`FrozenPrefix.replay` is a context in which the lower layers are skipped and the captured hidden states are
  fed to the first changing layer instead; embeddings, rotary tables and masks are still built by the model's own
  forward, so everything above the split runs exactly as in a full forward;
* :func:`prefill_rows` extends this to generation: one full prefill of the stock model gives every compared model
  its lower layers' key/value cache, and each model then prefills only its own top layers;
* :func:`greedy_rows` decodes every compared model at once: each step runs the shared lower layers once for all of
  them as one batch, then each model's own top layers.

A patched model is split the same way: the method lives in the top layers only. The split is exact (logits equal a
full forward's up to float rounding, tested per family); what it saves is the lower layers' compute, which for the
top 4 of SmolLM2-135M's 30 layers is most of a training step.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from .families import attention_layers


class FrozenPrefixError(ValueError):
    """The model cannot be split where asked; the message says why and what is accepted."""


class _Captured(Exception):  # noqa: N818 - control flow, not an error
    def __init__(self, hidden: torch.Tensor) -> None:
        self.hidden = hidden


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The ``nn.ModuleList`` of decoder layers (each holding one self-attention module), found by structure.

    Works through peft / method wrappers: it is the list whose items contain the model's attention modules in order.
    """
    attn = [m for _, m in attention_layers(model)]
    for _, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) != len(attn):
            continue
        if all(any(sub is a for sub in layer.modules()) for layer, a in zip(mod, attn, strict=True)):
            return mod
    raise FrozenPrefixError(f"{type(model).__name__}: found no list of decoder layers holding its attention modules")


def _passthrough(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    return hidden_states


def _hidden_arg(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


class FrozenPrefix:
    """A causal LM split before decoder layer ``first``: layers ``0 .. first-1`` are frozen and run once.

    Args:
        model: a transformers causal LM (or a wrapper of one: a ``PeftModel``, a patched model).
        first: index of the first decoder layer that changes; ``1 <= first < number of layers``.
    """

    def __init__(self, model: nn.Module, first: int) -> None:
        self.model = model
        self.layers = decoder_layers(model)
        n = len(self.layers)
        if isinstance(first, bool) or not isinstance(first, int) or not 1 <= first < n:
            raise FrozenPrefixError(f"first={first!r}: the split must leave at least one layer on each side; "
                                    f"accepted: 1 .. {n - 1} for this {n}-layer model")
        self.first = first

    @classmethod
    def top(cls, model: nn.Module, k: int) -> FrozenPrefix:
        """The split that leaves the top ``k`` decoder layers changing."""
        n = len(decoder_layers(model))
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k < n:
            raise FrozenPrefixError(f"top_layers={k!r}: accepted 1 .. {n - 1} for this {n}-layer model "
                                    "(all layers: leave it unset)")
        return cls(model, n - k)

    @property
    def top_indices(self) -> list[int]:
        """Indices of the changing layers."""
        return list(range(self.first, len(self.layers)))

    def frozen_parameters(self) -> list[nn.Parameter]:
        """The parameters the captured hidden states depend on: the frozen layers' and everything outside the
        decoder layers except the output head and the final norm (input and position embeddings, GPT-2's ``wpe``);
        tied input/output embeddings count as input embeddings."""
        top = {id(p) for layer in self.layers[self.first:] for p in layer.parameters()}
        after: set[int] = set()
        head = getattr(self.model, "get_output_embeddings", lambda: None)()
        if head is not None:
            after |= {id(p) for p in head.parameters()}
        parent = next((m for m in self.model.modules() if any(c is self.layers for c in m.children())), None)
        if parent is not None:  # the final norm: a norm module beside the layer list (norm, ln_f, final_layernorm)
            for name, child in parent.named_children():
                if "norm" in name.lower() or name == "ln_f":
                    after |= {id(p) for p in child.parameters()}
        emb = getattr(self.model, "get_input_embeddings", lambda: None)()
        before = {id(p) for p in emb.parameters()} if emb is not None else set()
        seen: set[int] = set()
        out = []
        for p in self.model.parameters():  # model order, each tensor once
            if id(p) in seen or id(p) in top or (id(p) in after and id(p) not in before):
                continue
            seen.add(id(p))
            out.append(p)
        return out

    def check_frozen(self) -> None:
        """Raise when a parameter below the split would train: its captured output would go stale."""
        names = {id(p): n for n, p in self.model.named_parameters()}
        live = [names.get(id(p), "?") for p in self.frozen_parameters() if p.requires_grad]
        if live:
            raise FrozenPrefixError(
                f"{len(live)} parameter(s) below layer {self.first} would train (e.g. {live[0]}), so the frozen "
                "layers' cached output would go stale; train only the top layers (tied input/output embeddings "
                "cannot train with a frozen prefix)")

    @torch.no_grad()
    def capture(self, **inputs: Any) -> torch.Tensor:
        """The hidden states entering layer ``first`` for ``inputs`` (the model's forward keyword arguments)."""
        def stop(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            raise _Captured(_hidden_arg(args, kwargs).detach())

        handle = self.layers[self.first].register_forward_pre_hook(stop, with_kwargs=True)
        was_training = self.model.training
        self.model.eval()  # the frozen layers run as at inference (no dropout): one fixed output per example
        try:
            self.model(**{"use_cache": False, **inputs})  # a caller's cache (``past_key_values``) is filled below
        except _Captured as c:
            return c.hidden
        finally:
            handle.remove()
            self.model.train(was_training)
        raise FrozenPrefixError("the forward did not reach the split layer")  # pragma: no cover

    @contextmanager
    def replay(self, hidden: torch.Tensor) -> Iterator[None]:
        """Within this context the model's forward skips the frozen layers and feeds ``hidden`` to layer ``first``.

        ``hidden`` must have the shape of the hidden states of the inputs the forward gets: (batch, tokens, width).
        """
        def inject(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            current = _hidden_arg(args, kwargs)
            if current.shape != hidden.shape:
                raise FrozenPrefixError(f"captured hidden states have shape {tuple(hidden.shape)}, the forward's "
                                        f"inputs {tuple(current.shape)}: replay the inputs they were captured for")
            h = hidden.to(device=current.device, dtype=current.dtype)
            if args:
                return (h, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": h}

        lower = list(self.layers[: self.first])
        # An instance-level forward already there (accelerate's device / offload hooks) is put back afterwards.
        own = [layer.__dict__.get("forward") for layer in lower]
        for layer in lower:
            layer.forward = _passthrough  # instance attribute: __call__ (and any checkpoint wrapper) reaches it
        handle = self.layers[self.first].register_forward_pre_hook(inject, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()
            for layer, previous in zip(lower, own, strict=True):
                if previous is None:
                    del layer.forward
                else:
                    layer.forward = previous


def cached_hidden(split: FrozenPrefix, sequences: Sequence[Sequence[int]], signature: dict[str, Any] | None = None,
                  *, progress: bool = False, folder: str | os.PathLike[str] | None = None) -> list[torch.Tensor]:
    """``split.capture`` of each token sequence (one unpadded example each) -> ``(tokens, width)`` tensors, read
    from a disk cache when there, captured and stored otherwise.

    The cache folder (default ``<attndenoise cache>/frozen/<key>``) is keyed by what the captured states depend on
    besides the tokens: the frozen weights themselves in their dtype (two random models of one config must not
    share an entry), the model config (rope settings, norm eps, ...), ``signature`` and the split; each
    sequence's file is named by a hash of its tokens, so runs with other seeds, steps or compared models reuse
    every example they share. Files are written atomically.
    """
    from safetensors.torch import load_file, save_file

    from .cache import default_cache_dir
    from .io import atomic_write
    from .progress import make_progress

    if folder is None:
        config = getattr(split.model, "config", None)
        settings = {k: v for k, v in (config.to_dict() if config is not None else {}).items()
                    if k not in ("_name_or_path", "transformers_version") and not k.startswith("_attn")}
        digest = hashlib.sha256(json.dumps({"base": signature, "first": split.first, "config": settings},
                                           sort_keys=True, default=str).encode())
        for p in split.frozen_parameters():  # the weights as they are, in their own dtype
            t = p.detach().to("cpu").contiguous()
            digest.update(str(t.dtype).encode())
            digest.update(t.view(torch.uint8).numpy().tobytes())
        folder = default_cache_dir() / "frozen" / digest.hexdigest()[:24]
    root = os.fspath(folder)
    os.makedirs(root, exist_ok=True)
    device = next(split.model.parameters()).device
    names = [hashlib.sha256(json.dumps(list(map(int, s))).encode()).hexdigest()[:32] + ".safetensors"
             for s in sequences]
    todo = [i for i, n in enumerate(names) if not os.path.isfile(os.path.join(root, n))]
    reporter, _ = make_progress(progress and bool(todo), len(todo), "frozen layers")
    every = max(1, len(todo) // 10)
    for j, i in enumerate(todo):
        target = os.path.join(root, names[i])
        if os.path.isfile(target):  # a duplicate sequence, written a moment ago
            continue
        h = split.capture(input_ids=torch.tensor([list(sequences[i])], device=device))[0].cpu().contiguous()
        # atomic: a killed capture leaves no half file under the final name
        atomic_write(target, lambda tmp, h=h: save_file({"hidden": h}, tmp))
        if reporter is not None and ((j + 1) % every == 0 or j + 1 == len(todo)):
            reporter.advance(f"{j + 1}/{len(todo)} examples", (j + 1) % every or every)
    if reporter is not None:
        reporter.close()
    return [load_file(os.path.join(root, n))["hidden"] for n in names]


@torch.no_grad()
def prefill_rows(
    base: nn.Module, rows: dict[str, nn.Module], input_ids: torch.Tensor, first: int
) -> tuple[Any, dict[str, Any]]:
    """Caches of ``input_ids`` for the stock ``base`` and for every model in ``rows``, paying the lower layers once.

    Every row model must equal ``base`` below decoder layer ``first`` (a method or training confined to the top
    layers; :func:`same_below` checks it). ``base`` is run in full once; each row then runs its top layers on the
    hidden states captured at ``first`` with a fresh cache, and borrows the base's cache entries of the lower
    layers (shared tensors: a transformers ``DynamicCache`` appends by concatenation, so decoding never writes into
    them). Batch size 1, no padding. Returns ``(base cache, {row: cache})``; pass a cache with the full prompt to
    ``generate`` after prefilling all but its last token.
    """
    from transformers import DynamicCache

    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError("prefill_rows takes one prompt: input_ids of shape (1, tokens)")
    split = FrozenPrefix(base, first)
    seen: list[torch.Tensor] = []

    def grab(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        seen.append(_hidden_arg(args, kwargs).detach())

    base_cache = DynamicCache(config=base.config)  # type: ignore[arg-type]
    handle = split.layers[first].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        # logits of the last position only: the full (tokens x vocabulary) logits cost more than the top layers
        base(input_ids=input_ids, past_key_values=base_cache, use_cache=True, logits_to_keep=1)
    finally:
        handle.remove()
    hidden = seen[0]
    out: dict[str, Any] = {}
    for name, row in rows.items():
        cache = DynamicCache(config=row.config)  # type: ignore[arg-type]
        with FrozenPrefix(row, first).replay(hidden):
            row(input_ids=input_ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        for i in range(first):
            cache.layers[i] = copy.copy(base_cache.layers[i])  # shallow: the tensors are shared, never written
        out[name] = cache
    return base_cache, out


@torch.no_grad()
def greedy_rows(
    base: nn.Module,
    rows: dict[str, nn.Module],
    prompt: torch.Tensor,
    first: int,
    *,
    max_new_tokens: int,
    eos: Sequence[int],
    stop: Callable[[list[int]], bool] | None = None,
) -> dict[str, list[int]]:
    """Greedy continuations of one ``prompt`` by every model in ``rows``, the shared lower layers run as one batch.

    Every row must equal ``base`` below decoder layer ``first`` (:func:`same_below`); a row may be ``base`` itself.
    The prompt is prefilled by :func:`prefill_rows`. Each decoding step then feeds every unfinished row's last token
    through the lower layers as one batch (one read of their weights per step instead of one per row: decoding a
    small model on a CPU is bound by that read), and each row's hidden state through that row's own top layers with
    its own cache. A row stops, as ``generate`` stops it, after an ``eos`` token, when ``stop(its new tokens)`` is
    true, or after ``max_new_tokens``; the returned ids include the stopping token, as ``generate``'s do.

    The tokens equal each model's own greedy ``generate`` up to float rounding: the batched lower layers may round
    differently from a batch of one, which flips a greedy choice only at a near tie (tested per family).
    """
    from transformers import DynamicCache

    if prompt.dim() != 2 or prompt.shape[0] != 1 or prompt.shape[1] < 2:
        raise ValueError("greedy_rows takes one prompt of at least two tokens: input_ids of shape (1, tokens)")
    names = list(rows)
    if not names or max_new_tokens < 1:
        return {n: [] for n in names}
    others = {n: m for n, m in rows.items() if m is not base}
    base_cache, caches = prefill_rows(base, others, prompt[:, :-1], first)
    for n in names:
        caches.setdefault(n, base_cache)  # the base as a row decodes in its own (full) prefill cache
    splits = {n: FrozenPrefix(rows[n], first) for n in names}
    lower_split = FrozenPrefix(base, first)
    # The lower layers' cache as a batch of one row each: the prompt's entries repeated (each step's concatenation
    # materialises them, as a per-row cache's would), the layers from ``first`` up left empty and never reached.
    lower = DynamicCache(config=base.config)  # type: ignore[arg-type]
    for i in range(first):
        layer: Any = copy.copy(base_cache.layers[i])
        layer.keys = layer.keys.expand(len(names), *layer.keys.shape[1:])
        layer.values = layer.values.expand(len(names), *layer.values.shape[1:])
        lower.layers[i] = layer
    # The rows whose output head equals the base's get their next token from one batched head call per step: the
    # head's weight (vocabulary x hidden, the largest matrix of a small model) is read once per step, not once per
    # row. Any logit post-processing a family applies after the head (a soft cap, a scale) is monotone, so the argmax
    # of the head's output is the greedy token. A row with its own head (e.g. a trained lm_head) runs in full.
    head: Any = base.get_output_embeddings()  # type: ignore[operator]
    shared_head = {n: same_head(rows[n].get_output_embeddings(), head) for n in names}  # type: ignore[operator]
    stops = set(int(t) for t in eos)
    out: dict[str, list[int]] = {n: [] for n in names}
    # ``live`` lists the unfinished rows in the order of the lower layers' batch: position j of that batch (its cache
    # entries, its token) belongs to row ``live[j]``. A finished row leaves the batch, so the lower layers, their
    # attention and the cache's per-step concatenation cost only what is still decoding (the trained rows' short
    # answers end well before the base's sentences).
    live = list(range(len(names)))
    tokens = prompt[:, -1:].expand(len(names), 1).clone()
    while live:
        for j, r in enumerate(live):
            # This row's view of the lower layers' cache *before* this step: the row's forward reads its past
            # length (positions, masks) there; its own lower layers are skipped and never append to it.
            cache = caches[names[r]]
            for i in range(first):
                src: Any = lower.layers[i]
                mine = copy.copy(src)
                mine.keys, mine.values = src.keys[j : j + 1], src.values[j : j + 1]
                cache.layers[i] = mine
        hidden = lower_split.capture(input_ids=tokens, past_key_values=lower, use_cache=True)
        nexts: dict[int, int] = {}
        finals: list[tuple[int, torch.Tensor]] = []
        for j, r in enumerate(live):
            name = names[r]
            with splits[name].replay(hidden[j : j + 1]):
                if shared_head[name]:
                    decoder: Any = rows[name].base_model  # the model without its head
                    state = decoder(input_ids=tokens[j : j + 1], past_key_values=caches[name],
                                    use_cache=True).last_hidden_state
                    finals.append((r, state[0, -1]))
                else:
                    logits = rows[name](input_ids=tokens[j : j + 1], past_key_values=caches[name], use_cache=True,
                                        logits_to_keep=1).logits
                    nexts[r] = int(logits[0, -1].argmax())
        if finals:
            picked = head(torch.stack([f for _, f in finals])).argmax(-1).tolist()
            nexts.update({r: int(t) for (r, _), t in zip(finals, picked, strict=True)})
        keep: list[int] = []
        for j, r in enumerate(live):
            name = names[r]
            nxt = nexts[r]
            out[name].append(nxt)
            tokens[j, 0] = nxt
            if not (nxt in stops or len(out[name]) >= max_new_tokens or (stop is not None and stop(out[name]))):
                keep.append(j)
        if len(keep) < len(live):  # rows finished: drop them from the lower layers' batch
            index = torch.tensor(keep, dtype=torch.long)
            lower.batch_select_indices(index)  # every layer of the cache; the empty upper ones are skipped
            tokens = tokens.index_select(0, index)
            live = [live[j] for j in keep]
    return out


def same_head(a: nn.Module | None, b: nn.Module | None) -> bool:
    """Whether output heads ``a`` and ``b`` compute the same function (the same module, or linear layers with equal
    weights and biases)."""
    if a is None or b is None:
        return False
    if a is b:
        return True
    if type(a) is not nn.Linear or type(b) is not nn.Linear:
        return False
    same_bias = (a.bias is None and b.bias is None) or (
        a.bias is not None and b.bias is not None and torch.equal(a.bias, b.bias))
    return a.weight.shape == b.weight.shape and torch.equal(a.weight, b.weight) and same_bias


def same_below(base: nn.Module, row: nn.Module, first: int) -> bool:
    """Whether ``row`` has exactly ``base``'s parameters in decoder layers ``0 .. first-1`` and its embeddings."""
    a = FrozenPrefix(base, first).frozen_parameters()
    b = FrozenPrefix(row, first).frozen_parameters()
    return len(a) == len(b) and all(x.shape == y.shape and torch.equal(x, y) for x, y in zip(a, b, strict=True))


__all__ = ["FrozenPrefix", "FrozenPrefixError", "cached_hidden", "decoder_layers", "greedy_rows", "prefill_rows",
           "same_below", "same_head"]
