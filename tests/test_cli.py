"""The command line: every registered method is listed; unknown commands fail with usage help."""

from typer.testing import CliRunner

import attndenoise as ad
from attndenoise.cli import app


def test_methods_lists_every_registered_method() -> None:
    result = CliRunner().invoke(app, ["methods"], env={"COLUMNS": "240"})
    assert result.exit_code == 0, result.output
    for name, cfg in ad.METHODS.items():
        assert name in result.output
        assert cfg.summary, f"{name} has no summary line"


def test_unknown_command_fails() -> None:
    result = CliRunner().invoke(app, ["no-such-command"])
    assert result.exit_code != 0


def test_cli_task_names_are_the_evaluation_tasks() -> None:
    from attndenoise.cli.evaluate import TASK_NAMES
    from attndenoise.evaluate import TASKS

    assert TASK_NAMES == TASKS
