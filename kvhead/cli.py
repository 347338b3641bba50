"""kvhead command line: models, head profiling and accuracy evaluation.

Every user error (bad option, unknown model, wrong profile) prints one line and exits with
status 2; tracebacks are reserved for bugs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from dashboards.cli import app as dashboards_app
from kvhead.core.options import SPEC_TOP_K
from kvhead.models import ModelError, resolve_model
from kvhead.models.cli import app as models_app
from kvhead.models.profiles import ProfileError, profile_for_model, user_profile_dir
from kvhead.presets import DEFAULT_PRESET, PRESETS, get_preset
from kvstore.metrics import METRICS_DIR, METRICS_PORT

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__.splitlines()[0])
app.add_typer(models_app, name="models")
app.add_typer(dashboards_app, name="dashboards")
console = Console()
DEFAULT_MODEL = "smollm2-135m-instruct"
USER_ERRORS = (ValidationError, ModelError, ProfileError, ValueError)


def _fail(err: Exception) -> None:
    message = str(err)
    if isinstance(err, ValidationError):
        message = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
    console.print(f"[red]error:[/red] {message}")
    raise typer.Exit(2)


def _ints(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated integers, got {text!r}") from None


def _floats(text: str) -> list[float]:
    try:
        return [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated numbers, got {text!r}") from None


def _load(model_dir: Path, page_size: int, device: str = "cpu"):
    """The reference runner and tokenizer of a resolved model folder."""
    import torch
    from transformers import AutoTokenizer

    from kvhead.eval.runner import ReferenceRunner

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but torch sees no CUDA device")
    runner = ReferenceRunner.from_pretrained(model_dir, page_size=page_size, device=device)
    return runner, AutoTokenizer.from_pretrained(model_dir)


@app.command()
def profile(
    model: Annotated[
        str, typer.Option(help="Registry name, HF folder or .gguf file.")
    ] = DEFAULT_MODEL,
    out: Annotated[
        Path | None, typer.Option(help="Profile JSON (default: KVHEAD_HOME/profiles).")
    ] = None,
    heatmap: Annotated[
        Path | None, typer.Option(help="PNG heatmap (default: next to the JSON).")
    ] = None,
    num_prompts: int = 3,
    context: int = 4096,
    decode_steps: int = 97,
    top_k: int = SPEC_TOP_K,
    page_size: int = 16,
    window: int = 16,
    unstable_fraction: float = 0.25,
    per_layer: Annotated[bool, typer.Option(help="Same unstable count in every layer.")] = False,
    seed: int = 0,
) -> None:
    """Measure per-head stability (RCO) and write the head profile and its heatmap."""
    from kvhead.eval.profiler import ProfileConfig, profile_heads, save_heatmap

    try:
        cfg = ProfileConfig(
            num_prompts=num_prompts,
            context=context,
            decode_steps=decode_steps,
            top_k=top_k,
            page_size=page_size,
            window=window,
            unstable_fraction=unstable_fraction,
            per_layer=per_layer,
            seed=seed,
        )
        model_dir, config = _model_config(model)
        check_context("--context + --decode-steps", context + decode_steps, config)
        runner, tokenizer = _load(model_dir, page_size)
        with console.status(f"profiling {cfg.num_prompts} prompts of {cfg.context} tokens"):
            result = profile_heads(runner, tokenizer, model_dir, cfg)
    except USER_ERRORS as err:
        _fail(err)
    out = out or user_profile_dir() / f"{Path(model_dir).name}-{result.model_fingerprint}.json"
    result.save(out)
    png = save_heatmap(
        result,
        heatmap or out.with_suffix(".png"),
        f"{Path(model_dir).name}\ninstability (K={top_k}, R={window}); red = unstable",
    )
    console.print(f"profile: {out}\nheatmap: {png}\nunstable heads: {len(result.unstable)}")


@app.command()
def coverage(
    model: Annotated[
        str, typer.Option(help="Registry name, HF folder or .gguf file.")
    ] = DEFAULT_MODEL,
    profile_path: Annotated[
        Path | None, typer.Option("--profile", help="Head profile JSON to extend.")
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="Where to write (default: the --profile file).")
    ] = None,
    offsets: Annotated[
        str, typer.Option(help="Corpus offsets of the calibration windows.")
    ] = "16384",
    context: int = 8192,
    steps: int = 64,
    step_pages: int = 8,
    page_size: int = 16,
    group_score: str = "softmax",
    sink_pages: int = 1,
    recent_pages: int = 4,
    bound_weight: Annotated[
        float, typer.Option(help="Share of the box spread in page scores.")
    ] = 1.0,
    rerank_interval: Annotated[
        int, typer.Option(help="Steps each ranking is kept (as stable heads keep theirs).")
    ] = 1,
    corpus: Annotated[
        str, typer.Option(help="Text of the calibration windows: licenses or python-docs.")
    ] = "licenses",
    device: Annotated[str, typer.Option(help="torch device: cpu or cuda.")] = "cpu",
) -> None:
    """Calibrate head-adaptive budgets: add per-head attention-mass coverage to a head profile."""
    from kvhead.eval.profiler import CoverageConfig, measure_coverage

    try:
        cfg = CoverageConfig(
            offsets=_ints(offsets),
            context=context,
            steps=steps,
            step_pages=step_pages,
            group_score=group_score,
            sink_pages=sink_pages,
            recent_pages=recent_pages,
            bound_weight=bound_weight,
            rerank_interval=rerank_interval,
            corpus=corpus,
        )
        model_dir, config = _model_config(model)
        check_context("--context", context, config)
        runner, tokenizer = _load(model_dir, page_size, device)
        head_profile = profile_for_model(model_dir, profile_path)
        if head_profile.page_size != page_size:
            raise ValueError(f"profile pages hold {head_profile.page_size} tokens, not {page_size}")
        with console.status(f"coverage: {len(cfg.offsets)} windows of {cfg.context} tokens"):
            head_profile.coverage = measure_coverage(runner, tokenizer, cfg)
    except USER_ERRORS as err:
        _fail(err)
    target = (
        out
        or profile_path
        or user_profile_dir() / f"{Path(model_dir).name}-{head_profile.model_fingerprint}.json"
    )
    head_profile.save(target)
    console.print(f"profile with coverage: {target}")


@app.command("eval")
def eval_(
    model: Annotated[
        str, typer.Option(help="Registry name, HF folder or .gguf file.")
    ] = DEFAULT_MODEL,
    preset: Annotated[
        str,
        typer.Option(
            help=f"Named settings: {', '.join(PRESETS)}; every option below overrides it."
        ),
    ] = DEFAULT_PRESET,
    profile_path: Annotated[
        Path | None,
        typer.Option("--profile", help="Head profile JSON (default: the one matching the model)."),
    ] = None,
    contexts: Annotated[
        str, typer.Option(help="Sequence lengths, comma-separated.")
    ] = "2048,4096,8192",
    gen_tokens: int = 256,
    page_size: int = 16,
    passkey_depths: Annotated[
        str, typer.Option(help="Needle depths, comma-separated.")
    ] = "0.1,0.3,0.5,0.7,0.9",
    seed: int = 0,
    output: Annotated[Path, typer.Option(help="JSON results file.")] = Path("kvhead-eval.json"),
    modes: Annotated[
        str | None,
        typer.Option(
            help="Sparse modes: quest, flexicache, quest+, flexicache+ (default: the preset's)."
        ),
    ] = None,
    top_k: Annotated[int | None, typer.Option(help="Pages per head's top-K set (K).")] = None,
    rerank_interval: Annotated[
        int | None, typer.Option(help="Decode steps between stable-head reranks (R).")
    ] = None,
    sink_pages: Annotated[
        int | None, typer.Option(help="+ modes: first pages always selected.")
    ] = None,
    recent_pages: Annotated[
        int | None, typer.Option(help="+ modes: newest pages always selected.")
    ] = None,
    group_score: Annotated[
        str | None, typer.Option(help="+ modes: GQA page score, max or softmax.")
    ] = None,
    leading_layers: Annotated[
        int | None, typer.Option(help="+ modes: first layers attend densely.")
    ] = None,
    unstable_dense: Annotated[
        bool | None, typer.Option(help="flexicache+: unstable heads attend densely.")
    ] = None,
    unstable_heads: Annotated[
        int | None,
        typer.Option(
            help="flexicache+: dense heads (leading layers', then the profile's most unstable)."
        ),
    ] = None,
    head_budgets: Annotated[
        bool | None, typer.Option(help="+ modes: per-head budgets from the profile's coverage.")
    ] = None,
    bound_weight: Annotated[
        float | None,
        typer.Option(help="+ modes: share of the page box's spread in its score (1: upper bound)."),
    ] = None,
    compensate: Annotated[
        bool | None, typer.Option(help="+ modes: skipped pages enter attention as summary tokens.")
    ] = None,
    rerank_lag: Annotated[
        bool | None,
        typer.Option(help="flexicache+: stable heads' reranks take effect one step late."),
    ] = None,
    dense_heads: Annotated[
        str | None,
        typer.Option(
            help="flexicache+: dense heads from the 'profile' (RCO), or chosen with budgets by "
            "'coverage'."
        ),
    ] = None,
    prompts: Annotated[
        int, typer.Option(help="Corpus windows per context (agreement, perplexity).")
    ] = 1,
    first_window: Annotated[int, typer.Option(help="Index of the first corpus window.")] = 0,
    corpus: Annotated[
        str, typer.Option(help="Text of the windows: licenses or python-docs.")
    ] = "licenses",
    device: Annotated[str, typer.Option(help="torch device: cpu or cuda.")] = "cpu",
) -> None:
    """Accuracy of sparse decoding (a preset, by default the accurate one) against dense."""
    from kvhead.eval.harness import EvalConfig, evaluate

    try:
        chosen = get_preset(preset)
        options = chosen.selection_options(
            top_k=top_k,
            rerank_interval=rerank_interval,
            sink_pages=sink_pages,
            recent_pages=recent_pages,
            group_score=group_score,
            leading_layers=leading_layers,
            unstable_dense=unstable_dense,
            unstable_heads=unstable_heads,
            head_budgets=head_budgets,
            bound_weight=bound_weight,
            compensate=compensate,
            rerank_lag=rerank_lag,
            dense_heads=dense_heads,
        )
        cfg = EvalConfig(
            contexts=_ints(contexts),
            gen_tokens=gen_tokens,
            top_k=options.top_k,
            page_size=page_size,
            rerank_interval=options.rerank_interval,
            passkey_depths=_floats(passkey_depths),
            seed=seed,
            prompts=prompts,
            first_window=first_window,
            corpus=corpus,
            options=options,
            modes=[m.strip() for m in modes.split(",") if m.strip()] if modes else chosen.modes,
        )
        for context in cfg.contexts:
            cfg.prompt_tokens(context)
        model_dir, config = _model_config(model)
        check_against_model(cfg, config)
        head_profile = profile_for_model(model_dir, profile_path)
        runner, tokenizer = _load(model_dir, page_size, device)
        output.parent.mkdir(parents=True, exist_ok=True)

        def save(partial) -> None:
            output.write_text(json.dumps(partial.model_dump(mode="json"), indent=1))
            last = partial.results[-1]
            console.print(f"context {last.context}: done in {last.seconds:.0f} s")

        report = evaluate(
            runner, tokenizer, head_profile, cfg, model=Path(model_dir).name, on_context=save
        )
    except USER_ERRORS as err:
        _fail(err)
    console.print(accuracy_table(report, preset if modes is None else None))
    console.print(f"results: {output}")


@app.command()
def serve(
    config: Annotated[
        Path | None,
        typer.Argument(help="Serving config YAML (default: SmolLM2, accurate preset, 1 replica)."),
    ] = None,
    model: Annotated[str | None, typer.Option(help="Override the config's model.")] = None,
    preset: Annotated[
        str | None, typer.Option(help=f"Override the config's preset: {', '.join(PRESETS)}.")
    ] = None,
    port: Annotated[int | None, typer.Option(help="Override the config's HTTP port.")] = None,
) -> None:
    """Serve the OpenAI API with FlexiCache on Ray Serve until Ctrl-C."""
    import time

    from deployments.config import ServeConfig, ServeConfigError
    from deployments.local import start, stop, stop_on_signals

    stop_on_signals()
    given = {"model": model, "preset": preset, "port": port}
    try:
        base = ServeConfig.load(config) if config else ServeConfig()
        cfg = ServeConfig.parse(
            base.model_dump(exclude_unset=True) | {k: v for k, v in given.items() if v},
            source=str(config or "kvhead serve"),
        )
        with console.status("starting") as shown:
            running = start(cfg, status=lambda stage: shown.update(stage))
    except (ServeConfigError, ModelError, TimeoutError) as err:
        stop()
        _fail(err)
    except KeyboardInterrupt:
        stop()
        raise typer.Exit(130) from None
    plan = running.plan
    heads = (
        f"{plan.dense_heads} dense + {plan.stable_heads} stable KV heads"
        if plan.dense_heads is not None
        else "stock vLLM attention"
    )
    console.print(
        f"[green]serving[/green] {running.model_id} at {running.url}/v1 "
        f"({cfg.preset if cfg.flexicache else 'no'} preset: {heads}; "
        f"{plan.cached_tokens} tokens of KV cache per replica)\n"
        f"  curl {running.url}/v1/chat/completions -H 'Content-Type: application/json' "
        f"""-d '{{"model": "{running.model_id}", "messages": [{{"role": "user", """
        f""""content": "Hello!"}}]}}'\n"""
        f"  python -c \"import openai; c = openai.OpenAI(base_url='{running.url}/v1', "
        f"api_key='-'); print(c.completions.create(model='{running.model_id}', "
        f"prompt='Once upon a time', max_tokens=16).choices[0].text)\"\n"
        f"  per-head state: {running.url}/v1/kvhead/heads   readiness: {running.url}/health\n"
        + (f"  metrics: {running.metrics_url}\n" if running.metrics_url else "")
        + "Ctrl-C stops the server.",
        soft_wrap=True,
    )
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        console.print("stopping")
    finally:
        stop()


@app.command()
def metrics(
    directory: Annotated[
        Path, typer.Argument(help="The folder engines publish into (serve config metrics_dir).")
    ] = Path(METRICS_DIR),
    host: Annotated[str, typer.Option(help="Address to bind.")] = "0.0.0.0",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port of /metrics.")] = METRICS_PORT,
) -> None:
    """Export the kvhead_* metrics that engines on this host publish (e.g. as a pod sidecar)."""
    import time

    from kvstore.metrics import serve_node_metrics

    try:
        server = serve_node_metrics(directory, host, port)
    except OSError as err:
        _fail(ValueError(f"cannot serve metrics on {host}:{port}: {err.strerror}"))
    console.print(f"exporting {directory} at http://{host}:{server.port}/metrics; Ctrl-C stops")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        server.close()


def _model_config(model: str) -> tuple[Path, dict]:
    """The model's folder and its ``config.json``, read without loading any weights."""
    model_dir = Path(resolve_model(model))
    return model_dir, json.loads((model_dir / "config.json").read_text())


def check_context(option: str, tokens: int, config: dict) -> None:
    """Refuse a context the model was not trained for (it would run for hours, then mislead)."""
    limit = config.get("max_position_embeddings")
    if limit is not None and tokens > limit:
        raise ValueError(f"{option} {tokens} exceeds the model's context of {limit} tokens")


def check_against_model(cfg, config: dict) -> None:
    """Refuse an evaluation the model cannot run, before any weights are loaded: contexts
    beyond its length, and dense-head or layer counts beyond its heads and layers."""
    check_context("--contexts", max(cfg.contexts), config)
    layers = config["num_hidden_layers"]
    heads = layers * config.get("num_key_value_heads", config["num_attention_heads"])
    opt = cfg.options
    if opt.leading_layers > layers:
        raise ValueError(
            f"--leading-layers {opt.leading_layers} exceeds the model's {layers} layers"
        )
    if opt.unstable_heads is not None and opt.unstable_heads > heads:
        raise ValueError(
            f"--unstable-heads {opt.unstable_heads} exceeds the model's {heads} kv heads"
        )


def accuracy_table(report, preset: str | None = None) -> Table:
    named = f"preset {preset}, " if preset else ""
    table = Table(
        title=f"{report.model}: sparse decoding vs dense ({named}K={report.config.top_k} pages)"
    )
    for column in (
        "context",
        "mode",
        "token agr.",
        "± s.e.",
        "free match",
        "PPL ratio",
        "passkey",
        "dense passkey",
        "resident",
    ):
        table.add_column(column, justify="right")
    for result in report.results:
        for mode, m in result.modes.items():
            table.add_row(
                str(result.context),
                mode,
                f"{m.token_agreement:.3f}",
                f"{m.agreement_stderr:.3f}",
                f"{m.free_match:.3f}",
                f"{m.perplexity_ratio:.4f}",
                f"{m.passkey_accuracy:.2f}",
                f"{result.dense_passkey_accuracy:.2f}",
                f"{m.resident_fraction:.3f}",
            )
    return table


if __name__ == "__main__":
    app()
