"""`kvhead profile` / `kvhead eval` end to end on a tiny model, and their error paths."""

import json

import pytest
from typer.testing import CliRunner

from kvhead.cli import app
from kvhead.models.tiny import build_tiny_llama

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_llama(
        tmp_path_factory.mktemp("tiny"), num_layers=2, num_q_heads=4, num_kv_heads=2
    )


def test_profile_then_eval(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("KVHEAD_HOME", str(tmp_path / "home"))
    small = ["--top-k", "4", "--page-size", "8"]
    result = runner.invoke(
        app,
        [
            "profile",
            "--model",
            str(tiny_dir),
            "--num-prompts",
            "1",
            "--context",
            "200",
            "--decode-steps",
            "9",
            "--window",
            "4",
            *small,
        ],
    )
    assert result.exit_code == 0, result.output
    profiles = list((tmp_path / "home" / "profiles").glob("*.json"))
    assert len(profiles) == 1 and profiles[0].with_suffix(".png").is_file()

    out = tmp_path / "acc.json"
    result = runner.invoke(
        app,
        [
            "eval",
            "--model",
            str(tiny_dir),
            "--preset",
            "paper",
            "--contexts",
            "160",
            "--gen-tokens",
            "16",
            "--rerank-interval",
            "4",
            "--passkey-depths",
            "0.5",
            "--output",
            str(out),
            *small,
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert set(report["results"][0]["modes"]) == {"quest", "flexicache"}
    assert "results:" in result.output

    result = runner.invoke(
        app,
        [
            "eval",
            "--model",
            str(tiny_dir),
            "--contexts",
            "160",
            "--gen-tokens",
            "16",
            "--preset",
            "paper",
            "--modes",
            "flexicache+",
            "--leading-layers",
            "3",
            "--output",
            str(out),
            *small,
        ],
    )
    assert result.exit_code == 2 and "exceeds the model's 2 layers" in result.output
    result = runner.invoke(
        app,
        [
            "eval",
            "--model",
            str(tiny_dir),
            "--contexts",
            "160",
            "--gen-tokens",
            "16",
            "--preset",
            "paper",
            "--modes",
            "flexicache+",
            "--unstable-heads",
            "3",
            "--output",
            str(out),
            *small,
        ],
    )  # the profile ranks one of the 4 heads unstable: 3 cannot be taken from it
    assert result.exit_code == 2 and "unstable head count must be in [0, 1]" in result.output
    assert set(json.loads(out.read_text())["results"][0]["modes"]) == {"quest", "flexicache"}

    budgets = [
        "eval",
        "--model",
        str(tiny_dir),
        "--preset",
        "paper",
        "--contexts",
        "160",
        "--gen-tokens",
        "8",
        "--rerank-interval",
        "4",
        "--passkey-depths",
        "",
        "--modes",
        "flexicache+",
        "--head-budgets",
        "--prompts",
        "2",
        "--output",
        str(out),
        *small,
    ]
    result = runner.invoke(app, budgets)
    assert result.exit_code == 2 and "needs a profile with coverage" in result.output
    result = runner.invoke(
        app,
        [
            "coverage",
            "--model",
            str(tiny_dir),
            "--profile",
            str(profiles[0]),
            "--context",
            "160",
            "--steps",
            "4",
            "--step-pages",
            "2",
            "--group-score",
            "max",
            "--sink-pages",
            "0",
            "--recent-pages",
            "1",
            "--page-size",
            "8",
        ],
    )
    assert result.exit_code == 0, result.output
    assert len(json.loads(profiles[0].read_text())["coverage"]["pages"]) == 10  # 20 pages, every 2
    result = runner.invoke(app, budgets)
    assert result.exit_code == 0, result.output
    mode = json.loads(out.read_text())["results"][0]["modes"]["flexicache+"]
    assert mode["scored_tokens"] == 16 and 0 <= mode["agreement_stderr"] <= 0.5


@pytest.mark.parametrize(
    "args, message",
    [
        (["eval", "--top-k", "0"], "top_k"),
        (["eval", "--contexts", "100", "--gen-tokens", "256"], "no room"),
        (["eval", "--passkey-depths", "2"], "depths"),
        (["eval", "--modes", "bogus"], "modes must be"),
        (["eval", "--preset", "paper", "--unstable-dense"], "apply only to the modes"),
        (["eval", "--modes", "flexicache+", "--sink-pages", "130"], "must fit in top_k"),
        (["eval", "--modes", "quest+", "--group-score", "mean"], "group_score"),
        (["eval", "--model", "no-such-model"], "unknown model"),
        (["eval", "--device", "cuda"], "no CUDA device"),
        (["coverage", "--group-score", "mean"], "group_score"),
        (["coverage", "--bound-weight", "-1"], "bound_weight"),
        (["eval", "--modes", "flexicache+", "--bound-weight", "1.5"], "bound_weight"),
        (["eval", "--preset", "paper", "--compensate"], "apply only to the modes"),
        (
            ["eval", "--preset", "paper", "--modes", "quest+", "--rerank-lag"],
            "act only in flexicache+",
        ),
        (
            ["eval", "--preset", "paper", "--modes", "quest+", "--unstable-heads", "4"],
            "act only in flexicache+",
        ),
        (["eval", "--modes", "flexicache+", "--unstable-heads", "-1"], "unstable_heads"),
        (
            [
                "eval",
                "--preset",
                "paper",
                "--modes",
                "flexicache+",
                "--unstable-dense",
                "--head-budgets",
                "--dense-heads",
                "coverage",
                "--unstable-heads",
                "3",
            ],
            "chooses its own",
        ),
        (["eval", "--modes", "flexicache+", "--dense-heads", "rco"], "dense_heads"),
        (
            ["eval", "--preset", "paper", "--modes", "flexicache+", "--dense-heads", "coverage"],
            "needs flexicache+ in modes, unstable_dense",
        ),
        (["coverage", "--rerank-interval", "0"], "rerank_interval"),
        (["eval", "--corpus", "news"], "corpus"),
        (["eval", "--preset", "fast"], "unknown preset 'fast'"),
        (["eval", "--contexts", "100000"], "exceeds the model's context of 8192 tokens"),
        (["eval", "--unstable-heads", "91"], "exceeds the model's 90 kv heads"),
        (
            ["profile", "--context", "9000"],
            "--context + --decode-steps 9097 exceeds the model's context",
        ),
        (["coverage", "--context", "8200"], "--context 8200 exceeds the model's context"),
        (["coverage", "--corpus", "news"], "corpus"),
        (["profile", "--unstable-fraction", "1.5"], "unstable_fraction"),
        (["profile", "--model", "/no/such/dir"], "no such file"),
    ],
)
def test_bad_input_is_one_clear_line(args, message, monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output


def test_eval_refuses_a_profile_of_another_model(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("KVHEAD_HOME", str(tmp_path / "home"))
    other = build_tiny_llama(tmp_path / "other", num_layers=3, num_q_heads=4, num_kv_heads=2)
    runner.invoke(
        app,
        [
            "profile",
            "--model",
            str(other),
            "--num-prompts",
            "1",
            "--context",
            "100",
            "--decode-steps",
            "5",
            "--window",
            "2",
            "--top-k",
            "2",
            "--page-size",
            "8",
            "--out",
            str(tmp_path / "other.json"),
        ],
    )
    result = runner.invoke(
        app,
        [
            "eval",
            "--model",
            str(tiny_dir),
            "--profile",
            str(tmp_path / "other.json"),
            "--preset",
            "paper",
            "--contexts",
            "160",
            "--gen-tokens",
            "16",
            "--page-size",
            "8",
        ],
    )
    assert result.exit_code == 2 and "measured on model" in result.output
    result = runner.invoke(
        app,
        [
            "eval",
            "--model",
            str(tiny_dir),
            "--preset",
            "paper",
            "--contexts",
            "160",
            "--gen-tokens",
            "16",
        ],
    )
    assert result.exit_code == 2 and "no head profile" in result.output
