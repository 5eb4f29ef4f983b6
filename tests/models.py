"""Tiny random models of every supported family, built from configs (nothing is downloaded)."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from unittest import mock

import torch
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

VOCAB = 97
_COMMON = dict(
    vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, eos_token_id=1, bos_token_id=2,
)


def _llama() -> PreTrainedModel:
    return LlamaForCausalLM(LlamaConfig(**_COMMON))


def _qwen2() -> PreTrainedModel:
    return Qwen2ForCausalLM(Qwen2Config(**_COMMON))  # q/k/v biases


def _qwen3() -> PreTrainedModel:
    return Qwen3ForCausalLM(Qwen3Config(**_COMMON, head_dim=8))  # per-head q_norm / k_norm


def _mistral() -> PreTrainedModel:
    return MistralForCausalLM(MistralConfig(**_COMMON, sliding_window=6))  # window shorter than the tests' inputs


def _gemma2() -> PreTrainedModel:
    cfg = Gemma2Config(**_COMMON, head_dim=8, sliding_window=6, attn_logit_softcapping=50.0, query_pre_attn_scalar=8)
    return Gemma2ForCausalLM(cfg)


def _gemma3() -> PreTrainedModel:
    cfg = Gemma3TextConfig(**_COMMON, head_dim=8, sliding_window=6, query_pre_attn_scalar=8)
    return Gemma3ForCausalLM(cfg)


def _phi3() -> PreTrainedModel:
    return Phi3ForCausalLM(Phi3Config(**_COMMON, partial_rotary_factor=0.5))  # fused qkv, partial rotary


def _gpt2() -> PreTrainedModel:
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=256, pad_token_id=0,
                     eos_token_id=1, bos_token_id=2)
    return GPT2LMHeadModel(cfg)


BUILDERS = {
    "llama": _llama, "qwen2": _qwen2, "qwen3": _qwen3, "mistral": _mistral, "gemma2": _gemma2,
    "gemma3": _gemma3, "phi3": _phi3, "gpt2": _gpt2,
}
FAMILIES = list(BUILDERS)


def tiny(family: str, seed: int = 0) -> PreTrainedModel:
    """A tiny random model of ``family`` in eval mode, float32, with non-trivial norms/biases."""
    torch.manual_seed(seed)
    model = BUILDERS[family]().eval()
    with torch.no_grad():  # randomise weights that init to constants so the tests see their effect
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(".bias") or "ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def peaky(family: str, seed: int = 0, layers: int = 4, window: int = 24) -> PreTrainedModel:
    """A tiny ``layers``-layer model of ``family`` with peaky attention (query/key projections x 15), sliding windows
    widened to ``window``: what SRA needs to select and edit rows (it edits nothing on near-uniform random maps)."""
    torch.manual_seed(seed)
    if family == "gpt2":
        cfg = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=layers, n_head=4, n_positions=256, pad_token_id=0,
                         eos_token_id=1, bos_token_id=2)
        model = GPT2LMHeadModel(cfg).eval()
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "ln_" in name or name.endswith(".bias"):
                    p.add_(0.1 * torch.randn_like(p))
    else:
        with mock.patch.dict(_COMMON, num_hidden_layers=layers):
            model = tiny(family, seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and any(s in name for s in ("q_proj", "k_proj", "qkv_proj", "c_attn")):
                p.mul_(15.0)
    if getattr(model.config, "sliding_window", None):  # a window of 6 hides every SRA target; 24 some of them
        model.config.sliding_window = window
        for m in model.modules():
            if getattr(m, "sliding_window", None):
                m.sliding_window = window
    return model


def inputs(batch: int = 2, length: int = 12, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=g)


def byte_level_llama_folder(folder: Path, *, layers: int = 2, positions: int = 4096, **config: Any) -> Path:
    """Save a random Llama with a byte-level BPE tokenizer (it reads any text) into ``folder``: a local model
    folder for commands that load by path (`--model FOLDER`)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>", *sorted(alphabet)])}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="</s>")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=positions,
                      bos_token_id=1, eos_token_id=2, pad_token_id=2, **config)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder
