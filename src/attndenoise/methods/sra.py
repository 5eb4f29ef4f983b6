"""SRA, Scaled ReAttention: inference-time re-weighting of selected attention rows at prefill.

Paper: Gao et al., "Pay Attention to What You Need", arXiv 2307.13365 (its first version, by Gao, Wang, Fang, Hu and
Cheng, is titled "Empower Your Model with Longer and Better Context Comprehension" and names the technique Attention
Transition). The rule follows the authors' code: github.com/yileijin/Attention-Transition, ``modeling_llama.py``
(``init_sra``, ``get_attention_block_inter`` / ``get_attention_block_outer``, ``adjust_attention_weights_inter`` /
``_outer``). Math and decisions: docs/methods.md, section SRA.

Inference only, no parameters. At prefill, in every layer but the last, a few *row blocks* of the softmax map
``P`` are edited; everything else is the stock attention:

* **inter rule** (layers ``0 .. L-2``): the span ``[b+3, n-t)`` of the prompt is cut into ``L+3`` chunks of size
  ``c = ceil((n-b-t-3)/(L+3))``; layer ``l`` edits query rows ``[s, e)``, ``s = (l+3)c + b + 3``,
  ``e = min(s+c, n-t)``, toward the key chunk three chunks back ``[s-3(e-s), s-2(e-s))``, with threshold
  ``tau = alpha_inter / (s-b)`` and strengthen factor ``strengthen_inter``;
* **outer rule** (layers ``1 .. L-2``): the last ``t`` rows ``[n-t, n)`` edit toward the key chunk
  ``[(l+2)c'+3, min((l+2)c'+3+c', n-t))``, ``c' = ceil((n-t-3)/(L+3))``, ``tau = alpha_outer/(n-t)``,
  strengthen factor ``strengthen_outer``.

Each rule needs its span to exist: the inter rule a prompt of ``n > b + t + 3`` valid tokens, the outer rule
``n > t + 3``. The two rules are decided **independently**, per example, as in the authors' code: a prompt with
``t + 3 < n <= b + t + 3`` gets the outer rule only, and a prompt that fits neither runs exactly as the stock model.
With the defaults ``b = 100, t = 200`` every prompt of 303 tokens or fewer is too short for the inter rule, which
covers ordinary chat prompts; raising there would make ``generate`` fail on them, so skipping is the default
(``short_prompt="skip"``, with one :class:`ShortPromptWarning` per configuration) and ``short_prompt="error"``
raises a ``ValueError`` naming the example and the rule instead.

The edit of one (head, row): the row is *selected* when some target key has ``P > tau``. In a selected row every
probability below ``tau`` is set to 0; the removed mass ``R`` times the strengthen factor ``s`` is added to the
target keys only, in proportion 100 for target keys that survive (``P >= tau``) and 5 for eliminated ones. Rows are
not renormalised: an edited row sums to ``1 + (s-1) R``. ``R`` is the mass actually removed (the authors write
``1 - remaining``, the same up to float round-off).

The paper's motivation (RoPE's long-distance decay, the transformed map ``D P A``) is computed neither by the
authors' code nor here. The common ``anneal_steps`` / ``lambda_*`` fields of :class:`MethodConfig` do not apply to
SRA and are ignored. How this implementation improves on the authors' (memory, batches, padding): :meth:`SRA.attend`.
"""

from __future__ import annotations

import math
import warnings
import weakref
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .. import registry
from ..config import ConfigError, MethodConfig, boolean, choice, positive
from .base import AttentionCall, LayerContext, MethodModule

#: redistribution weights of a surviving / an eliminated target key (the authors' 20:1 split)
SURVIVOR_WEIGHT = 100.0
ELIMINATED_WEIGHT = 5.0
#: accepted values of ``SRAConfig.short_prompt``
SHORT_PROMPT_CHOICES = ("error", "skip")


class ShortPromptWarning(UserWarning):
    """An SRA rule was skipped because the prompt is too short for its span (``short_prompt="skip"``)."""


class ShortPromptError(ValueError):
    """A prompt is too short for an SRA rule and ``short_prompt="error"``: a user setting, not a bug, so the
    command line reports it in one line."""


@dataclass
class SRAConfig(MethodConfig):
    """SRA options (docs/methods.md, section SRA). Defaults are the authors' ``init_sra``; their demo used ``b=5, t=50,
    alpha_inter=alpha_outer=0.5, strengthen_inter=strengthen_outer=5``.

    Attributes:
        b: protected leading tokens (the inter rule's span starts at ``b + 3``).
        t: trailing "question" tokens: the outer rule edits the last ``t`` rows, and both rules stop at ``n - t``.
        dynamic_t: use ``t = int(n / dynamic_div)`` for each prompt instead of ``t`` (the authors' option).
        dynamic_div: divisor of ``dynamic_t`` (20: the last 5% of the prompt).
        alpha_inter: inter-rule threshold factor, ``tau = alpha_inter / (s - b)``; ``0`` disables the edit.
        alpha_outer: outer-rule threshold factor, ``tau = alpha_outer / (n - t)``; ``0`` disables the edit.
        strengthen_inter: the factor ``s`` by which the removed mass is scaled before it goes to the targets.
        strengthen_outer: the same for the outer rule.
        inter: run the inter rule (layers ``0 .. L-2``).
        outer: run the outer rule (layers ``1 .. L-2``).
        short_prompt: what happens to a rule whose span does not fit the prompt (``n <= b + t + 3`` for the inter
            rule, ``n <= t + 3`` for the outer rule): ``"skip"`` (default; that rule is left out for that example,
            the other rule still runs when it fits, as in the authors' code; one :class:`ShortPromptWarning` per
            configuration) or ``"error"`` (a ``ValueError`` naming the example and the rule).
        max_block_elements: at most this many explicit probabilities (heads x rows x keys) are built at once on
            the fast path; edited rows are processed in slices of that size (memory, not results, depends on it).

    ``layers`` (default all) chooses the patched layers; the rule itself decides which of them edit, and the last
    layer never does. ``anneal_steps`` and the ``lambda_*`` fields are ignored: SRA has no schedule.
    """

    name = "sra"
    summary = "inference-only Scaled ReAttention: re-weights selected attention rows at prefill"
    trainable: ClassVar[bool] = False
    uses_lambda_schedule: ClassVar[bool] = False

    b: int = 100
    t: int = 200
    dynamic_t: bool = False
    dynamic_div: float = 20.0
    alpha_inter: float = 0.5
    alpha_outer: float = 0.3
    strengthen_inter: float = 4.0
    strengthen_outer: float = 4.0
    inter: bool = True
    outer: bool = True
    short_prompt: str = "skip"
    max_block_elements: int = 1 << 21

    def validate(self) -> None:
        super().validate()
        for name in ("b", "t", "max_block_elements"):
            v = getattr(self, name)
            low = 1 if name == "max_block_elements" else 0
            if not isinstance(v, int) or isinstance(v, bool) or v < low:
                raise ConfigError(f"{name}={v!r}: must be an integer >= {low}")
        for name in ("dynamic_t", "inter", "outer"):
            boolean(name, getattr(self, name))
        if not (self.inter or self.outer):
            raise ConfigError("inter=False and outer=False: SRA would do nothing; enable at least one rule")
        positive("dynamic_div", self.dynamic_div)
        for name in ("alpha_inter", "alpha_outer", "strengthen_inter", "strengthen_outer"):
            positive(name, getattr(self, name), allow_zero=True)
        choice("short_prompt", self.short_prompt, SHORT_PROMPT_CHOICES)

    def trailing(self, n: int) -> int:
        """``t`` for a prompt of ``n`` valid tokens."""
        return int(n / self.dynamic_div) if self.dynamic_t else self.t


@dataclass(frozen=True)
class Segment:
    """One edited row block of one layer, in positions relative to the example's valid region."""

    rule: str
    rows: tuple[int, int]  # query rows [start, end)
    targets: tuple[int, int]  # target keys [start, end)
    tau: float
    strengthen: float


def _need(config: SRAConfig, rule: str, t: int) -> tuple[int, str]:
    """The prompt length ``rule`` needs to be exceeded, and its formula: ``n > b + t + 3`` (inter), ``n > t + 3``."""
    return (config.b + t + 3, "b + t + 3") if rule == "inter" else (t + 3, "t + 3")


def plan(config: SRAConfig, n: int, layer: int, num_layers: int, example: int = 0) -> list[Segment]:
    """The row blocks layer ``layer`` of ``num_layers`` edits in a prompt of ``n`` valid tokens (module docstring).

    Each rule that runs on this layer (inter: layers ``0 .. L-2``, outer: ``1 .. L-2``) is decided on its own, as in
    the authors' code: it applies when its span fits (inter ``n > b + t + 3``, outer ``n > t + 3``). A rule that does
    not fit is left out with ``short_prompt="skip"`` (so a prompt that fits neither gets ``[]``: the stock model)
    and raises ``ValueError`` with ``short_prompt="error"``. Blocks whose threshold factor is 0 are left out too
    (they cannot change anything: no probability is below ``tau = 0``), and so are blocks that come out empty.
    """
    c, L = config, num_layers
    if layer >= L - 1:
        return []  # the last layer is never edited
    t = c.trailing(n)
    rules = []
    for rule, on in (("inter", c.inter), ("outer", c.outer and layer >= 1)):
        if not on:
            continue
        need, what = _need(c, rule, t)
        if n > need:
            rules.append(rule)
        elif c.short_prompt == "error":
            raise ShortPromptError(
                f"SRA: example {example} has {n} valid prompt tokens; the {rule} rule needs more than {what} = "
                f"{need} (b={c.b}, t={t}{', t = n/dynamic_div' if c.dynamic_t else ''}). Lower b/t, use "
                f"dynamic_t=True, or pass short_prompt='skip' to skip a rule that does not fit (the other rule "
                f"still runs when it fits)."
            )
    out: list[Segment] = []
    if "inter" in rules and c.alpha_inter > 0:
        size = math.ceil((n - c.b - t - 3) / (L + 3))
        s = (layer + 3) * size + c.b + 3
        e = min(s + size, n - t)
        if e > s:
            w = e - s
            out.append(Segment("inter", (s, e), (s - 3 * w, s - 2 * w), c.alpha_inter / (s - c.b), c.strengthen_inter))
    if "outer" in rules and c.alpha_outer > 0 and t > 0:
        size = math.ceil((n - t - 3) / (L + 3))
        start = (layer + 2) * size + 3
        end = min(start + size, n - t)
        if end > start:
            out.append(Segment("outer", (n - t, n), (start, end), c.alpha_outer / (n - t), c.strengthen_outer))
    return out


def skipped_rules(config: SRAConfig, n: int, num_layers: int) -> list[str]:
    """The rules that would edit some patched layer of a ``num_layers``-layer model but do not fit a prompt of
    ``n`` valid tokens, each as ``"the inter rule (needs n > b + t + 3 = 303)"``; ``[]`` when none is skipped."""
    chosen = config.select_layers(num_layers)
    t = config.trailing(n)
    out = []
    for rule, on, first in (("inter", config.inter, 0), ("outer", config.outer, 1)):
        if on and any(first <= i <= num_layers - 2 for i in chosen):
            need, what = _need(config, rule, t)
            if n <= need:
                out.append(f"the {rule} rule (needs n > {what} = {need})")
    return out


#: ids of the configurations that have already warned about a skipped rule (dropped when the config is collected)
_WARNED: set[int] = set()


def _warn_short_once(config: SRAConfig, n: int, num_layers: int, example: int) -> None:
    """One :class:`ShortPromptWarning` per configuration (it is shared by every layer of a patched model), the first
    time a prompt is too short for a rule; later prompts, layers and decoding steps stay silent."""
    key = id(config)
    if key in _WARNED:
        return
    skipped = skipped_rules(config, n, num_layers)
    if not skipped:
        return
    _WARNED.add(key)
    weakref.finalize(config, _WARNED.discard, key)
    t = config.trailing(n)
    warnings.warn(
        f"SRA: example {example} has {n} valid prompt tokens (b={config.b}, t={t}), too short for "
        f"{' and '.join(skipped)}. A rule is skipped for every prompt too short for it (the other rule still runs "
        f"when it fits) and a prompt that fits no rule runs as the stock model. Shown once for this configuration; "
        f"lower b/t or use dynamic_t=True to edit shorter prompts, or pass short_prompt='error' to raise instead.",
        ShortPromptWarning,
        stacklevel=2,
    )


def edit_rows(
    p: torch.Tensor, targets: slice, tau: float, strengthen: float, visible: torch.Tensor | None,
    inplace: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply the SRA edit to probability rows ``p`` (..., rows, keys) -> ``(edited rows, changed (..., rows))``.

    ``visible`` (broadcastable to the target block) marks the target keys the model's mask lets the rows see; hidden
    ones get no mass. ``changed`` is False where the edit removed no mass: those rows come back bit for bit.
    ``inplace`` edits ``p`` itself (only when autograd does not need it): one full-size allocation fewer.
    """
    tgt = p[..., targets]
    selected = (tgt > tau).any(dim=-1)  # the row holds a "hidden gem" among its targets
    weight = torch.where(tgt >= tau, SURVIVOR_WEIGHT, ELIMINATED_WEIGHT)  # before p changes: tgt is a view
    if visible is not None:
        weight = weight * visible
    # one comparison pass over the rows: unselected rows get limit 0, and no probability is below 0
    limit = torch.where(selected, tau, 0.0).to(p.dtype).unsqueeze(-1)
    elim = p < limit
    before = p.sum(dim=-1)
    edited = p.masked_fill_(elim, 0.0) if inplace else p.masked_fill(elim, 0.0)
    del elim
    # R: the removed mass; exactly 0 where nothing positive was eliminated (identical rows, identical sums)
    removed = before - edited.sum(dim=-1)
    # a selected row has a visible target above tau (weight 100), so the clamp only guards unselected rows (R = 0)
    gain = strengthen * removed / weight.sum(dim=-1).clamp_min(1.0)
    edited[..., targets] += gain.unsqueeze(-1) * weight
    return edited, removed > 0


def _valid_spans(mask: torch.Tensor | None, batch: int, nk: int) -> list[tuple[int, int]]:
    """``(start, n)`` of each example's valid tokens: keys that some query of the mask may see."""
    if mask is None:
        return [(0, nk)] * batch
    allowed = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
    keys = allowed[..., :nk].any(dim=-2).any(dim=1).expand(batch, nk)  # (B, Nk)
    spans = []
    for i in range(batch):
        idx = keys[i].nonzero().flatten()
        if idx.numel() == 0:
            spans.append((0, 0))
            continue
        start, n = int(idx[0]), idx.numel()
        if int(idx[-1]) - start + 1 != n:
            raise ValueError(f"SRA: example {i} has non-contiguous valid tokens; only left/right padding is supported")
        spans.append((start, n))
    return spans


class SRA(MethodModule[SRAConfig]):
    """Stock fused attention, then the SRA edit of this layer's row blocks, recomputed explicitly."""

    @property
    def edits(self) -> bool:
        """Whether this layer can edit at all (not the last layer, and a rule that runs here)."""
        c, i, L = self.config, self.info.index, self.info.num_layers
        return i < L - 1 and (c.inter or (c.outer and i >= 1))

    def attend(
        self, attn: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, ctx: LayerContext,
        call: AttentionCall,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The stock output, with the rows this layer's rule selects re-computed from edited probabilities.

        How this differs from the authors' demonstration code (which builds the full map in every layer, reads batch
        element 0 for every row of the batch and assumes no left padding):

        * the whole map is never built on the fast path: the stock fused attention (SDPA) computes every row, then
          only the edited row blocks are recomputed from explicit probabilities, in slices of at most
          ``max_block_elements`` probabilities, so the extra memory is ``O(rows x n)`` per layer and bounded by the
          option;
        * ``n`` and all positions are counted per example inside its valid (non-padding) region, read from the
          model's own attention mask, so batches and left padding work; ``t = n/dynamic_div`` is computed per
          example and the configuration is never changed while running;
        * a (head, row) pair whose edit removes no probability mass keeps the fused output bit for bit (so
          ``alpha = 0`` is exactly the stock model);
        * with a sliding-window mask, target keys the mask hides get no mass (weight 0 instead of 5). The authors'
          Llama has no window; without one every target key is visible (targets precede the edited rows), and the
          rule is theirs.

        Prefill only: a forward whose queries do not cover all its keys (``q_len == 1`` decoding, or a chunk
        appended to a cache with past tokens) is the stock computation. A static (pre-allocated) cache looks like
        "past tokens" and so disables SRA; use the default dynamic cache. Generating *without* a cache re-runs
        prefill on every step (``n`` grows, the edited blocks move), so, unlike the trainable methods, cached and
        uncached generation differ by design: SRA's generation is an SRA prefill followed by stock decoding steps
        over the SRA-altered cache.
        """
        out, pmap = call.one_map(query, key, value)
        nq, nk = query.shape[-2], key.shape[-2]
        if nq == 1 or nq != nk or not self.edits:  # decoding / cached chunk / last layer: stock (prefill only)
            return out, pmap
        cfg = self.config
        mask = call.mask
        if mask is not None and mask.dtype == torch.bool and mask.shape[-1] != nk:
            mask = mask[..., :nk]
        out_new: torch.Tensor | None = None
        map_new: torch.Tensor | None = None
        for b, (start, n) in enumerate(_valid_spans(mask, query.shape[0], nk)):
            if not n:
                continue
            if cfg.short_prompt == "skip":
                _warn_short_once(cfg, n, self.info.num_layers, example=b)
            segments = plan(cfg, n, self.info.index, self.info.num_layers, example=b)
            if not segments:
                continue
            if out_new is None:  # copies, so autograd's saved outputs are never overwritten
                out_new = out.clone()
                map_new = pmap.clone() if pmap is not None else None
            self._edit_example(b, start, segments, query, key, value, mask, call, out_new, pmap, map_new)
        if out_new is None:
            return out, pmap
        return out_new, map_new

    def _edit_example(
        self, b: int, start: int, segments: list[Segment], query: torch.Tensor, key: torch.Tensor,
        value: torch.Tensor, mask: torch.Tensor | None, call: AttentionCall, out: torch.Tensor,
        pmap: torch.Tensor | None, map_out: torch.Tensor | None,
    ) -> None:
        h, hkv, nk = query.shape[1], key.shape[1], key.shape[-2]
        g = h // hkv
        k = key[b].float()  # (Hkv, Nk, D), GQA-native: never repeated
        v = value[b].float()
        scale = call.scaling if call.scaling is not None else query.shape[-1] ** -0.5
        step = max(1, self.config.max_block_elements // (h * nk))
        # the explicit rows are fresh tensors: edit them in place unless autograd needs them
        inplace = pmap is None and not (
            torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad)
        )
        for seg in segments:
            tgt = slice(start + seg.targets[0], start + seg.targets[1])
            for r0 in range(seg.rows[0], seg.rows[1], step):
                rows = slice(start + r0, start + min(r0 + step, seg.rows[1]))
                # q_len == k_len here, so under a causal mask no row of the slice sees a key past its last row:
                # dropping those keys is exact and saves the work on them (most of it for early inter blocks)
                kmax = rows.stop if call.causal else nk
                visible = None if mask is None else self._visible(mask, b, rows, kmax)
                if pmap is not None:  # eager path: the map exists already
                    p = pmap[b, :, rows, :kmax]
                else:
                    p = _row_probs(query[b, :, rows], k[:, :kmax], visible, scale, call.softcap,
                                   causal_tail=mask is None and call.causal)
                # targets precede the rows, so only a given mask (sliding window) can hide one
                vis_t = None if visible is None else visible[..., tgt]
                edited, changed = edit_rows(p, tgt, seg.tau, seg.strengthen, vis_t, inplace=inplace)
                probs = F.dropout(edited, call.dropout, training=True) if call.dropout > 0 else edited
                r = probs.shape[-2]
                new = torch.matmul(probs.reshape(hkv, g * r, kmax), v[:, :kmax]).reshape(h, r, -1)
                keep = changed.unsqueeze(-1)
                out[b, :, rows] = torch.where(keep, new.to(out.dtype), out[b, :, rows])
                if map_out is not None:
                    map_out[b, :, rows, :kmax] = torch.where(keep, edited.to(map_out.dtype), p)

    @staticmethod
    def _visible(mask: torch.Tensor, b: int, rows: slice, nk: int) -> torch.Tensor:
        """(1 or H, r, nk) bool: which of the first ``nk`` keys the rows may see under the model's mask.

        An additive float mask is read as visible/hidden only (transformers hands this path boolean masks).
        """
        m = mask[b if mask.shape[0] > 1 else 0, :, rows, :nk]
        return m if m.dtype == torch.bool else m > torch.finfo(m.dtype).min / 2


def _row_probs(
    q: torch.Tensor, k: torch.Tensor, visible: torch.Tensor | None, scale: float, softcap: float | None,
    causal_tail: bool = False,
) -> torch.Tensor:
    """Explicit softmax rows (H, r, nk) in float32 for queries ``q`` (H, r, D) against keys ``k`` (Hkv, nk, D).

    ``visible`` is the model's mask for these rows; without one, ``causal_tail`` masks causally, which for the last
    ``r`` consecutive rows against keys up to the last of them only touches the trailing (r x r) block.
    """
    h, r, d = q.shape
    hkv, nk = k.shape[0], k.shape[1]
    scores = torch.matmul(q.float().reshape(hkv, (h // hkv) * r, d), k.transpose(-1, -2)).reshape(h, r, nk)
    scores.mul_(scale)  # in place on a fresh tensor: matmul's backward does not need it
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if visible is not None:
        scores.masked_fill_(~visible, float("-inf"))
    elif causal_tail:
        future = torch.ones(r, r, dtype=torch.bool, device=q.device).triu_(1)
        scores[..., nk - r :].masked_fill_(future, float("-inf"))
    return torch.softmax(scores, dim=-1)


registry.register(SRAConfig, SRA)
