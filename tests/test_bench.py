"""``attndenoise bench`` runs in quick mode and prints ratios to stock for the chosen method."""

import re
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from attndenoise import benchmark as B
from attndenoise.cli import app


def test_bench_quick_prints_ratios() -> None:
    t0 = time.perf_counter()
    result = CliRunner().invoke(app, ["bench", "daa", "--quick"], env={"COLUMNS": "240"})
    elapsed = time.perf_counter() - t0
    assert result.exit_code == 0, result.output
    rows = [line for line in result.output.splitlines() if "daa" in line]
    assert rows, result.output
    ratios = [float(x) for x in re.findall(r"\b\d+\.\d\d\b", rows[0])]
    assert len(ratios) == 4, rows[0]  # step x stock, x stock x2, peak memory x stock, decode x stock
    assert all(0 < r < 50 for r in ratios), rows[0]
    assert "stock:" in result.output and "ms/step" in result.output
    # a guard against a runaway quick mode, not a speed measurement (it took 160 s beside a 2-thread job on the
    # 2-core machine)
    assert elapsed < 400, f"quick mode took {elapsed:.0f} s"


def test_bench_rejects_unknown_and_inference_only_methods() -> None:
    for name in ("no-such-method", "sra"):
        result = CliRunner().invoke(app, ["bench", name, "--quick", "--no-memory", "--no-decode"])
        assert result.exit_code != 0


def test_publish_writes_the_result_file_and_replaces_only_its_section(tmp_path: Path) -> None:
    from attndenoise.benchmark import publish

    (tmp_path / "BENCHMARKS.md").write_text(
        "# Benchmarks\n\nintro\n\n<!-- bench:x -->\nold\n\n<!-- /bench:x -->\n\nafter\n")
    publish("x", "new table\n", tmp_path)
    publish("y", "other\n", tmp_path)
    assert (tmp_path / "bench" / "results" / "x.md").read_text() == "new table\n"
    text = (tmp_path / "BENCHMARKS.md").read_text()
    assert text == ("# Benchmarks\n\nintro\n\n<!-- bench:x -->\nnew table\n\n<!-- /bench:x -->\n\nafter\n\n"
                    "<!-- bench:y -->\nother\n\n<!-- /bench:y -->\n")


def test_smollm2_shape_builds_its_geometry() -> None:
    cfg = B.shape_config("smollm2")
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]) == (
        30, 576, 1536, 49152)
    assert cfg["max_position_embeddings"] >= 8192 and cfg["tie_word_embeddings"] is True
    assert B.MODEL is B.SHAPES["toy"]
    model = B.build_model("stock", train=False, shape="smollm2", overrides={"num_hidden_layers": 2})
    c = model.config
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (
        2, 576, 9, 3, 64)
    assert c.rope_parameters["rope_theta"] == 100000.0
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.weight.shape == (576, 576) and attn.k_proj.weight.shape == (192, 576)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied
    assert "30 layers" in B.model_description("smollm2") and "head dim 64" in B.model_description("smollm2")


def test_diffllama_peer_has_the_shape_and_trains_its_attention() -> None:
    model = B.build_model("diffllama", train=True, shape="smollm2", overrides={"num_hidden_layers": 2})
    assert type(model).__name__ == "DiffLlamaForCausalLM"
    c = model.config
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (18, 6, 32)  # 9 / 3 DIFF head pairs of 64
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.weight.shape == (576, 576) and attn.k_proj.weight.shape == (192, 576)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".self_attn." in n for n in trainable)
    assert any(n.endswith("lambda_q1") for n in trainable)

    t = B._Trainer("diffllama", 32, "toy")  # a training step on the toy shape
    before = [p.detach().clone() for p in t.model.parameters() if p.requires_grad]
    t.step()
    after = [p for p in t.model.parameters() if p.requires_grad]
    assert any(not torch.equal(a, b) for a, b in zip(after, before, strict=True))


def test_cpu_flags_helper_names_the_flags_that_matter() -> None:
    flags = B.cpu_flags()
    assert set(flags) == {"avx2", "avx512f", "amx_tile"} and all(isinstance(v, bool) for v in flags.values())
    summary = B.cpu_summary()
    assert "AVX-512: " in summary and "AMX: " in summary and "AVX2: " in summary
    assert B.cpu_summary() in B.machine_info(1)


def test_shape_is_passed_through_and_unknown_shapes_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown shape"):
        B.shape_config("no-such-shape")
    times = B.decode_times(["stock", "diffllama"], 8, 2, 1, quiet=True, shape="toy")
    assert set(times) == {"stock", "diffllama"} and all(len(v) == 1 for v in times.values())
    result = CliRunner().invoke(app, ["bench", "daa", "--quick", "--shape", "nope", "--no-memory", "--no-decode"])
    assert result.exit_code != 0


def test_compile_option_compiles_every_decoded_configuration(monkeypatch: pytest.MonkeyPatch) -> None:
    compiled = []

    def fake_compile(model, **kw):  # type: ignore[no-untyped-def]
        compiled.append((type(model).__name__, kw))
        return model

    monkeypatch.setattr(torch, "compile", fake_compile)
    result = CliRunner().invoke(app, ["bench", "daa", "--quick", "--compile", "--no-memory"], env={"COLUMNS": "240"})
    assert result.exit_code == 0, result.output
    assert len(compiled) == 2 and all(kw == {"dynamic": True} for _, kw in compiled)  # stock and daa
    assert "compiled decode" in result.output
