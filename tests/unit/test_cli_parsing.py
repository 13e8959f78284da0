"""The ``dspex`` command's parsing and error line, without a broker."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any, ClassVar

import pytest
from typer.testing import CliRunner

from dspex.streams.cli import app
from dspex.streams.cli import variables as variables_cli


class RecordingClient:
    """Stands in for the client: records what ``variables set`` would publish."""

    published: ClassVar[list[Any]] = []

    def __init__(self, settings: object) -> None:
        pass

    def __enter__(self) -> RecordingClient:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def get_variable(self, name: str, **where: object) -> None:
        return None

    def set_variable(self, name: str, value: Any, **options: Any) -> dict[str, Any]:
        self.published.append(value)
        record = {"name": name, "value_json": str(value), "version": 1, "var_type": "float"}
        return {**record, "scope": "global", "program_id": None, "module": None}


def test_variables_set_takes_a_negative_value(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(variables_cli, "Client", RecordingClient)
    RecordingClient.published = []
    result = CliRunner().invoke(app, ["variables", "set", "bias", "-0.5", "--type", "float"])
    assert result.exit_code == 0, result.output
    assert RecordingClient.published == [-0.5]


def test_an_error_is_one_line_however_long(tmp_path: Path) -> None:
    missing = tmp_path / ("a-settings-file-name-long-enough-to-wrap-" * 4 + ".toml")
    done = subprocess.run(
        [sys.executable, "-m", "dspex.streams", "--settings", str(missing), "topics", "list"],
        capture_output=True,
        text=True,
        env={"COLUMNS": "80", "PATH": "/usr/bin:/bin"},
        timeout=60,
    )
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    assert str(missing) in lines[0]


def test_pipelines_put_refuses_a_malformed_file_before_any_broker(tmp_path: Path) -> None:
    path = tmp_path / "support.yaml"
    path.write_text(
        "inputs: [question, 3]\n"
        "stages:\n"
        "  summarize: {signature: 'topic -> summary', map: {over: $input.t, concurrncy: 2}}\n"
    )
    done = subprocess.run(
        [sys.executable, "-m", "dspex.streams", "pipelines", "put", "support", str(path)],
        capture_output=True,
        text=True,
        env={"COLUMNS": "80", "PATH": "/usr/bin:/bin", "KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1"},
        timeout=60,
    )
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        "error: pipeline support is invalid (3 problems): "
        'inputs: expected the run\'s input fields, e.g. "question, topics: list[str]"; '
        "stages.summarize.map.concurrncy: unknown key (known: over, concurrency); "
        "outputs: expected a mapping of field name to reference"
    ]
