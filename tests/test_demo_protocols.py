"""The demo's training protocols: which rows run, which baseline each row is judged against (hand-made
numbers), per-method settings across a method's rows, the matched LoRA's size, the bars plot's numbers, and one
small end-to-end run of every protocol."""

import json
from pathlib import Path

import pytest
from test_demo import _config  # the tiny model built in seconds
from typer.testing import CliRunner

from attndenoise.cli import app
from attndenoise.demo import (
    DemoConfig,
    _verdict_table,
    baseline_of,
    matched_lora_rank,
    paper_row,
    protocol_of,
    render_report,
    run_demo,
    trainable_methods,
    verdict_pairs,
)
from attndenoise.evaluate import EvalResults, NeedleCell, QAResult
from attndenoise.plots import plot_protocol_bars, protocol_bars
from attndenoise.study import full_rows
from attndenoise.train import projection_modules

DIFFERENTIAL = ("daa", "dex", "diff", "diffk", "diffq", "diffv", "dint", "lowrank_dint")


def test_default_rows_are_each_method_in_its_papers_protocol() -> None:
    cfg = DemoConfig()
    assert cfg.trained_rows() == ["none", *(f"{m}+attn" for m in DIFFERENTIAL), "lora", "opamp+lora"]
    assert cfg.labels()[:2] == ["base", "sra"]
    assert paper_row("opamp") == "opamp+lora" and paper_row("diffv") == "diffv+attn"
    assert DemoConfig(methods=["opamp"]).trained_rows() == ["none", "lora", "opamp+lora"]


def test_all_protocols_expands_to_every_method_in_every_protocol() -> None:
    cfg = DemoConfig(methods=["daa", "opamp"], all_protocols=True)
    assert cfg.trained_rows() == ["none", "daa+attn", "opamp+attn", "lora", "daa+lora", "opamp+lora",
                                  "lora~daa", "daa", "lora~opamp", "opamp"]
    every = DemoConfig(all_protocols=True).trained_rows()
    assert sorted(every) == sorted(full_rows())  # the study's --full rows, no more, no less
    assert len(every) == 2 + 4 * len(trainable_methods())
    assert [protocol_of(r) for r in cfg.trained_rows()] == ["attention"] * 3 + ["lora"] * 3 + ["alone"] * 4


def test_cli_all_protocols_flag_reaches_the_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[DemoConfig] = []

    def fake_run(cfg: DemoConfig, progress: object = None) -> Path:
        seen.append(cfg)
        return tmp_path / "report.md"

    monkeypatch.setattr("attndenoise.cli.demo.run_demo", fake_run)
    result = CliRunner().invoke(app, ["demo", "--all-protocols", "--methods", "diffq", "--out", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    assert seen[0].all_protocols and seen[0].labels() == [
        "base", "sra", "none", "diffq+attn", "lora", "diffq+lora", "lora~diffq", "diffq"]
    CliRunner().invoke(app, ["demo", "--methods", "diffq", "--out", str(tmp_path / "o")])
    assert not seen[1].all_protocols and seen[1].trained_rows() == ["none", "diffq+attn", "lora"]


def test_each_row_is_paired_with_its_own_protocols_baseline() -> None:
    labels = DemoConfig(methods=["daa"], all_protocols=True).labels()
    assert verdict_pairs(labels) == [("sra", "base"), ("daa+attn", "none"), ("daa+lora", "lora"),
                                     ("daa", "lora~daa")]
    assert [baseline_of(r) for r in ("none", "lora", "lora~daa", "base")] == [None] * 4
    # A row whose baseline is not run is not judged (never against another protocol's baseline).
    assert verdict_pairs(["base", "none", "daa+attn", "daa+lora"]) == [("daa+attn", "none")]


def _result(label: str, seed: int, em: dict[float, float], needle: float = 1.0) -> EvalResults:
    return EvalResults(label=label, seed=seed, qa=[QAResult(r, 100, v, v, v) for r, v in em.items()],
                       needle=[NeedleCell(64, 0.5, 3, needle)])


# Hand-made exact match at noise 0.8 / 0.9 for two seeds. Against its own baseline daa+attn is better, daa+lora
# worse and daa (alone) better; against `none` (the old demo's only reference) daa+lora would be better and daa
# worse, so the verdicts below tell the pairing apart.
HAND = {
    "base": ([0.90, 0.90], [0.60, 0.62]),
    "sra": ([0.90, 0.90], [0.61, 0.61]),
    "none": ([0.96, 0.96], [0.80, 0.82]),
    "daa+attn": ([0.96, 0.96], [0.90, 0.92]),
    "lora": ([0.99, 0.99], [0.95, 0.97]),
    "daa+lora": ([0.99, 0.99], [0.88, 0.90]),
    "lora~daa": ([0.94, 0.94], [0.60, 0.62]),
    "daa": ([0.96, 0.96], [0.70, 0.72]),
}


def _hand_results() -> list[EvalResults]:
    return [_result(label, s, {0.0: 1.0, 0.8: v8[s], 0.9: v9[s]}, needle=0.5 if "+" in label else 1.0)
            for label, (v8, v9) in HAND.items() for s in (0, 1)]


def test_verdict_table_judges_each_row_within_its_protocol_with_hand_made_numbers() -> None:
    cfg = DemoConfig(methods=["daa"], all_protocols=True, seeds=2, eval_noise=(0.0, 0.8, 0.9))
    params = {"base": 0, "sra": 0, "none": 1000, "daa+attn": 1010, "lora": 200, "daa+lora": 210,
              "lora~daa": 12, "daa": 10}
    text = render_report(cfg, _hand_results(), {}, {}, {"protocols": Path("protocols.png"),
                                                        "needle_base": Path("n.png"), "attention": Path("a.png")},
                         1.0, params=params, ranks={"lora~daa": 1})
    lines = text.splitlines()
    start = lines.index("## Does a method beat its own protocol's baseline at noise >= 0.8?")
    head = next(i for i in range(start, len(lines)) if lines[i].startswith("| row |"))
    end = lines.index("", head)
    table = lines[head + 2:end]  # the verdict table's rows, below its header and separator
    assert table == [  # every seed beyond every baseline seed (attndenoise.stats.seed_verdict), the ranges shown
        "| sra | inference | 0 | base | 0 | within spread (+0.000; seeds 0.900-0.900 vs 0.900-0.900) | "
        "within spread (+0.000; seeds 0.610-0.610 vs 0.600-0.620) |",
        "| daa+attn | attention | 1,010 | none | 1,000 | within spread (+0.000; seeds 0.960-0.960 vs 0.960-0.960) | "
        "**yes** (+0.100; seeds 0.900-0.920 vs 0.800-0.820) |",
        "| daa+lora | lora | 210 | lora | 200 | within spread (+0.000; seeds 0.990-0.990 vs 0.990-0.990) | "
        "no, worse (-0.070; seeds 0.880-0.900 vs 0.950-0.970) |",
        "| daa | alone | 10 | lora~daa | 12 | **yes** (+0.020; seeds 0.960-0.960 vs 0.940-0.940) | "
        "**yes** (+0.100; seeds 0.700-0.720 vs 0.600-0.620) |",
    ]
    assert ("Beyond the seed spread, better than its own protocol's baseline: daa+attn at 0.9, daa at 0.8, daa at "
            "0.9; worse: daa+lora at 0.9.") in lines
    # The QA table shows every row's protocol, parameters and the needle score as the forgetting column.
    assert "| daa+lora | lora | 210 | 1.000 ± 0.000 | 0.990 ± 0.000 | 0.890 ± 0.014 | 0.890 ± 0.014 | " \
           "0.890 ± 0.014 | 0.500 ± 0.000 |" in lines
    assert "`lora~daa` has rank 1" in text and "no pass-key examples" in text
    # The table helper on its own: a row is only compared with the reference it is paired with.
    by = {}
    for r in _hand_results():
        by.setdefault(r.label, []).append(r)
    one = _verdict_table(by, [0.9], [("daa+lora", "none")])
    assert one[-1].startswith("| daa+lora | lora | ? | none | ? | **yes**")  # what a cross-protocol pairing says


def test_one_seed_report_says_there_is_no_spread() -> None:
    cfg = DemoConfig(methods=["daa"], eval_noise=(0.8, 0.9))
    results = [r for r in _hand_results() if r.seed == 0 and r.label in cfg.labels()]
    text = render_report(cfg, results, {}, {}, {"protocols": Path("p.png"), "needle_base": Path("n.png"),
                                                "attention": Path("a.png")}, 1.0)
    assert "One seed: there is no spread to judge by (run `--seeds 3`)." in text
    assert "| daa+attn | attention | ? | none | ? | +0.000 (1 seed: no spread; run --seeds 3) |" in text


def test_method_settings_apply_to_every_row_of_the_method(tmp_path: Path) -> None:
    cfg = DemoConfig(methods=["daa", "opamp"], all_protocols=True, learning_rates={"opamp": 5e-4, "lora": 1e-3,
                                                                                   "daa+lora": 3e-3},
                     method_options={"daa": {"lambda_schedule": "linear"}, "daa+lora": {"lambda_init": 0.5}})
    # a learning rate follows the protocol: +attn rows train as `none`, +lora rows and matched LoRAs as `lora`;
    # a method's own entry is the rate of the method alone
    assert [cfg.learning_rate_for(r) for r in ("opamp+attn", "opamp+lora", "opamp")] == [
        cfg.learning_rate, 1e-3, 5e-4]
    assert cfg.learning_rate_for("lora~opamp") == 1e-3  # a matched LoRA trains like `lora`
    assert cfg.learning_rate_for("daa+lora") == 3e-3 and cfg.learning_rate_for("daa+attn") == cfg.learning_rate
    for r in ("daa+attn", "daa"):
        assert cfg.method_options_for(r) == {"anneal_steps": 75, "lambda_schedule": "linear"}
    assert cfg.method_options_for("daa+lora") == {"anneal_steps": 75, "lambda_schedule": "linear", "lambda_init": 0.5}
    assert cfg.method_options_for("lora~daa") == {} and cfg.method_options_for("none") == {}
    with pytest.raises(ValueError, match="method_options names unknown"):
        DemoConfig(method_options={"lora": {"x": 1}})
    with pytest.raises(ValueError, match="unknown row"):
        DemoConfig(learning_rates={"daa+nope": 1e-3})


def test_matched_lora_rank_gives_about_the_methods_parameter_count() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from attndenoise import registry
    from attndenoise.patch import apply

    model = LlamaForCausalLM(LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2, intermediate_size=128, vocab_size=100))
    per_rank = sum(m.weight.shape[0] + m.weight.shape[1] for m in projection_modules(model).values())
    for method in ("daa", "opamp"):
        probe = LlamaForCausalLM(model.config).requires_grad_(False)
        apply(probe, registry.config_for(method))
        count = sum(p.numel() for p in probe.parameters() if p.requires_grad)
        rank = matched_lora_rank(model, method)
        assert abs(rank * per_rank - count) <= per_rank / 2 or (rank == 1 and count < per_rank)
    assert all(p.requires_grad for p in model.parameters())  # the model itself is left untouched


def test_protocol_bars_draw_each_panel_with_the_base_first(tmp_path: Path) -> None:
    results = _hand_results()
    panels = {"attention": ["none", "daa+attn"], "lora": ["lora", "daa+lora"]}
    bars = protocol_bars(results, panels, reference="base", baselines=["none", "lora"], groups=[0.8, 0.9])
    at = [(b.panel, b.label, b.group) for b in bars]
    assert at[:3] == [("attention", "base", 0.8), ("attention", "none", 0.8), ("attention", "daa+attn", 0.8)]
    assert len(bars) == 2 * 2 * 3
    b = next(b for b in bars if b.label == "daa+lora" and b.group == 0.9)
    assert (round(b.mean, 3), round(b.sd, 4), b.seeds, b.baseline) == (0.89, round(0.02 / 2 ** 0.5, 4), 2, False)
    assert next(b for b in bars if b.label == "base").reference
    path = plot_protocol_bars(results, panels, tmp_path / "p.png", reference="base", baselines=["none", "lora"],
                              colour_key={"daa+attn": "daa", "daa+lora": "daa"}, group_label=lambda r: f"{r:g}")
    assert path.stat().st_size > 1000


def test_every_protocol_end_to_end_on_a_tiny_model(tmp_path: Path) -> None:
    cfg = _config(tmp_path, methods=["opamp"], all_protocols=True)
    report = run_demo(cfg)
    out = report.parent
    kinds = {r: json.loads((out / "runs" / "seed0" / r / "run.json").read_text()) for r in cfg.trained_rows()}
    assert {r: k["kind"] for r, k in kinds.items()} == {
        "none": "none", "opamp+attn": "method+attn", "lora": "lora", "opamp+lora": "method+lora",
        "lora~opamp": "lora", "opamp": "method"}
    # The matched LoRA's size is about the method's (the nearest rank), and the report says which rank.
    n_method, n_lora = kinds["opamp"]["trainable_parameters"], kinds["lora~opamp"]["trainable_parameters"]
    rank = kinds["lora~opamp"]["config"]["lora_rank"]
    per_rank = n_lora / rank
    assert abs(n_lora - n_method) <= per_rank / 2 or (rank == 1 and n_method < per_rank)
    text = report.read_text()
    assert f"`lora~opamp` has rank {rank}" in text
    assert any(line.startswith(f"| opamp | alone | {n_method:,} | lora~opamp | {n_lora:,} |")
               for line in text.splitlines())
    assert (out / "protocols.png").stat().st_size > 1000
    # A run recorded before a TrainConfig field existed (here: no `attention` key) is still reused.
    run_json = out / "runs" / "seed0" / "opamp" / "run.json"
    run = json.loads(run_json.read_text())
    del run["config"]["attention"]
    run_json.write_text(json.dumps(run))
    assert "6 finished training run(s) were reused" in run_demo(cfg).read_text()
