"""The demo end to end on a model built in seconds: every row trained/evaluated, report and plots written, finished
runs reused, and the report's numbers equal the results files it was built from (an independent read-back)."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from attndenoise.cli import app
from attndenoise.demo import DemoConfig, _gold_share, run_demo
from attndenoise.evaluate import read_results

SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=64, batch_size=8, steps=20, warmup_steps=5, max_position_embeddings=512,
             induction_steps=5)


def _config(tmp: Path, **kw: object) -> DemoConfig:
    base = dict(out=str(tmp / "out"), methods=["daa"], steps=3, batch_size=2, synthetic_examples=8, n_eval=3,
                eval_noise=(0.0, 0.8), context_lengths=(48,), depths=(0.5,), needle_n=1, attention_examples=2,
                tiny=SMALL, cache_dir=str(tmp / "cache"), threads=1)
    base.update(kw)
    return DemoConfig(**base)  # type: ignore[arg-type]


def test_demo_runs_every_row_and_reports_what_it_measured(tmp_path: Path) -> None:
    cfg = _config(tmp_path, seeds=2)
    messages: list[str] = []
    report = run_demo(cfg, messages.append)
    # one progress line per finished row (5 rows x 2 seeds) with elapsed time and ETA, the last with nothing left
    rows = [m for m in messages if m.startswith("row ")]
    assert [r.split(" done")[0] for r in rows] == [f"row {i}/10" for i in range(1, 11)]
    assert all(", ETA " in r and "; elapsed " in r for r in rows) and rows[-1].endswith("ETA 0 s")
    assert rows[0].startswith("row 1/10 done: base (seed 0) in ")
    text = report.read_text()
    out = report.parent
    for png in ("protocols.png", "attention_to_gold.png", "needle_base.png"):
        assert (out / png).stat().st_size > 1000
    results = read_results(out)
    labels = {r.label for r in results}
    assert labels == {"base", "sra", "none", "lora", "daa+attn"}  # daa in its paper's protocol
    assert len(results) == 2 * len(labels)  # every row, every seed
    # The table's cell for daa at noise 0.8 is the mean and std of what results.json holds for it.
    vals = [q.exact_match for r in results if r.label == "daa+attn" for q in r.qa if q.noise_ratio == 0.8]
    mean = sum(vals) / 2
    sd = (sum((v - mean) ** 2 for v in vals)) ** 0.5  # sample std of 2 values: |a - b| / sqrt(2)
    row = next(line for line in text.splitlines() if line.startswith("| daa+attn |"))
    assert f"{mean:.3f} ± {sd:.3f}" in row
    # The row shows its protocol, its trainable-parameter count (from run.json) and its needle score (forgetting).
    run0 = json.loads((out / "runs" / "seed0" / "daa+attn" / "run.json").read_text())
    assert run0["kind"] == "method+attn"
    assert row.startswith(f"| daa+attn | attention | {run0['trainable_parameters']:,} |")
    needle = [sum(c.exact_match for c in r.needle) / len(r.needle) for r in results if r.label == "daa+attn"]
    nm = sum(needle) / 2
    assert row.endswith(f" | {nm:.3f} ± {abs(needle[0] - needle[1]) / 2 ** 0.5:.3f} |")
    assert "no pass-key examples" in text
    att = json.loads((out / "attention.json").read_text())
    assert set(att) == labels and all(len(v) == 2 for v in att.values())
    for label in ("none", "lora", "daa+attn"):
        assert (out / "runs" / "seed1" / label / "run.json").exists()
    # Both verdict tables have their rows (within protocol: daa+attn against none, never against lora), and the
    # per-method option chosen on validation is applied to the method's row and reported.
    lines = text.splitlines()
    assert any(line.startswith("| daa+attn | attention | ") and "| none |" in line for line in lines)
    assert not any(line.startswith("| daa+attn |") and "| lora |" in line for line in lines)
    assert any(line.startswith("| daa+attn | attention | ") and "| base |" in line for line in lines)
    assert any(line.startswith("| none | attention | ") and "| base |" in line for line in lines)
    assert any(line.startswith("| sra | inference | 0 | base | 0 |") for line in lines)
    assert "daa lambda_schedule=linear" in text
    assert "Inference-only methods run on the base model: sra with alpha_inter=0.25" in text
    assert run0["config"]["method_options"]["lambda_schedule"] == "linear"
    # Training time is the training loop's, read from each seed's run.json.
    secs = [json.loads((out / "runs" / f"seed{i}" / "daa+attn" / "run.json").read_text())["seconds"] for i in (0, 1)]
    m = sum(secs) / 2
    time_row = [line for line in lines if line.startswith("| daa+attn |")][-1]
    assert time_row == f"| daa+attn | {m:.1f} ± {abs(secs[0] - secs[1]) / 2 ** 0.5:.1f} |"


def test_gold_share_is_only_given_for_unsigned_maps() -> None:
    assert _gold_share([0.3, 0.5], [0.1, 0.5]) == f"{(0.75 + 0.5) / 2:.3f} ± {((0.75 - 0.5) / 2 ** 0.5):.3f}"
    assert _gold_share([0.3, 0.5], [-0.1, 0.2]) == "n/a (signed map)"


def test_demo_reuses_finished_runs_and_refuses_other_settings(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    run_demo(cfg)
    run_json = tmp_path / "out" / "runs" / "seed0" / "daa+attn" / "run.json"
    stamp = run_json.stat().st_mtime_ns
    report = run_demo(cfg)
    assert run_json.stat().st_mtime_ns == stamp  # reused, not retrained
    assert "3 finished training run(s) were reused" in report.read_text()  # none, lora, daa+attn
    with pytest.raises(FileExistsError, match="other settings"):
        run_demo(_config(tmp_path, steps=4))


def test_demo_config_errors_name_the_accepted_values(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="trainable: .*daa"):
        _config(tmp_path, methods=["sra"])
    with pytest.raises(ValueError, match="seeds"):
        _config(tmp_path, seeds=0)
    result = CliRunner().invoke(app, ["demo", "--methods", "nope", "--out", str(tmp_path / "x")])
    assert result.exit_code != 0 and "trainable" in result.output


def test_demo_learning_rate_overrides_apply_per_row_and_are_checked(tmp_path: Path) -> None:
    cfg = _config(tmp_path, learning_rate=2e-3, learning_rates={"daa": 5e-4})
    assert cfg.learning_rate_for("daa") == 5e-4
    assert cfg.learning_rate_for("daa+attn") == 2e-3  # within the attention protocol: none's rate
    assert cfg.learning_rate_for("none") == 2e-3
    assert _config(tmp_path).learning_rate_for("opamp") == 5e-4  # the default override, even when opamp is not run
    with pytest.raises(ValueError, match="unknown row"):
        _config(tmp_path, learning_rates={"nope": 1e-4})
    with pytest.raises(ValueError, match="positive"):
        _config(tmp_path, learning_rates={"daa": 0.0})


def test_sra_options_is_a_deprecated_name_for_method_options_sra() -> None:
    with pytest.warns(DeprecationWarning, match="sra_options is deprecated"):
        cfg = DemoConfig(sra_options={"b": 3})
    assert cfg.method_options["sra"]["b"] == 3 and cfg.method_options["sra"]["t"] == 24  # merged into the defaults
    assert DemoConfig().method_options["sra"] == {"b": 2, "t": 24, "alpha_inter": 0.25, "alpha_outer": 0.25,
                                                   "strengthen_inter": 2.0, "strengthen_outer": 2.0,
                                                   "short_prompt": "skip"}
    with pytest.raises(ValueError, match="method_options names unknown method"):
        DemoConfig(method_options={"bogus": {}})
