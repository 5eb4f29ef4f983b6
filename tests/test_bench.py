"""``attndenoise bench`` runs in quick mode and prints ratios to stock for the chosen method."""

import re
import time
from pathlib import Path

from typer.testing import CliRunner

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
    assert elapsed < 120, f"quick mode took {elapsed:.0f} s"


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
