"""Profiler determinism and the evaluation harness on a tiny random model."""

import math

import pytest
import torch
from transformers import AutoTokenizer

from kvhead.eval.harness import EvalConfig, evaluate
from kvhead.eval.inputs import corpus_window, passkey_prompt
from kvhead.eval.profiler import ProfileConfig, profile_heads, save_heatmap
from kvhead.eval.runner import ReferenceRunner
from kvhead.models.tiny import build_tiny_llama


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    model_dir = build_tiny_llama(
        tmp_path_factory.mktemp("tiny"), num_layers=2, num_q_heads=4, num_kv_heads=2
    )
    return (
        model_dir,
        ReferenceRunner.from_pretrained(model_dir, page_size=8),
        AutoTokenizer.from_pretrained(model_dir),
    )


PROFILE = ProfileConfig(
    num_prompts=2,
    context=256,
    decode_steps=17,
    top_k=4,
    page_size=8,
    window=4,
    unstable_fraction=0.5,
)


def test_profile_is_deterministic_for_a_seed(tiny, tmp_path):
    model_dir, runner, tok = tiny
    first = profile_heads(runner, tok, model_dir, PROFILE)
    second = profile_heads(runner, tok, model_dir, PROFILE)
    assert first.instability == second.instability and first.unstable == second.unstable
    assert len(first.unstable) == 2  # half of 2 layers x 2 heads
    assert all(0.0 <= v <= 1.0 for row in first.instability for v in row)
    png = save_heatmap(first, tmp_path / "p.png", "tiny")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_with_k_covering_all_pages_matches_dense(tiny):
    model_dir, runner, tok = tiny
    profile = profile_heads(runner, tok, model_dir, PROFILE)
    cfg = EvalConfig(
        contexts=[160],
        gen_tokens=24,
        top_k=64,
        page_size=8,
        rerank_interval=4,
        passkey_depths=[0.5],
    )
    report = evaluate(runner, tok, profile, cfg, model="tiny")
    (result,) = report.results
    for mode in ("quest", "flexicache"):
        m = result.modes[mode]
        assert m.token_agreement == 1.0 and m.free_match == 1.0 and m.first_divergence == 24
        assert m.mean_kl == pytest.approx(0.0, abs=1e-6) and m.miss_margins == []
        assert m.perplexity_ratio == pytest.approx(1.0, abs=1e-5)
        assert m.passkey_accuracy == result.dense_passkey_accuracy
        assert m.resident_fraction == 1.0  # every page selected: nothing can be offloaded


def test_eval_with_small_k_saves_pages(tiny):
    model_dir, runner, tok = tiny
    profile = profile_heads(runner, tok, model_dir, PROFILE)
    cfg = EvalConfig(
        contexts=[320], gen_tokens=24, top_k=4, page_size=8, rerank_interval=4, passkey_depths=[0.2]
    )
    (result,) = evaluate(runner, tok, profile, cfg, model="tiny").results
    flexi, quest = result.modes["flexicache"], result.modes["quest"]
    assert quest.resident_fraction == 1.0
    # half the heads stable with 4 + tail of ~37 pages resident
    assert 0.5 < flexi.resident_fraction < 0.7
    assert math.isfinite(flexi.perplexity_ratio) and 0 <= flexi.token_agreement <= 1


def test_bad_eval_config_is_rejected():
    with pytest.raises(ValueError, match="contexts"):
        EvalConfig(contexts=[])
    with pytest.raises(ValueError, match="depths"):
        EvalConfig(passkey_depths=[1.5])
    with pytest.raises(ValueError, match="no room"):
        EvalConfig(gen_tokens=256).prompt_tokens(200)


def test_passkey_prompt_holds_the_key_at_depth(tiny):
    _, _, tok = tiny
    ids = passkey_prompt(tok, 300, 0.5, 48213)
    text = tok.decode(ids)
    assert text.count("48213") == 2 and text.rstrip().endswith("The pass key is")
    assert 0.3 < text.index("48213") / len(text) < 0.7
    assert abs(ids.numel() - 300) <= 2


def test_both_corpora_ship_and_cut_windows(tiny):
    from kvhead.eval.inputs import corpus_text

    _, _, tok = tiny
    licenses, docs = corpus_text("licenses"), corpus_text("python-docs")
    assert "GNU GENERAL PUBLIC LICENSE" in licenses and "GNU GENERAL PUBLIC LICENSE" not in docs
    assert "Python" in docs and len(docs) > 3 * len(licenses)  # room for many disjoint 8k windows
    a, b = (
        corpus_window(tok, 64, 10, corpus="licenses"),
        corpus_window(tok, 64, 10, corpus="python-docs"),
    )
    assert a.shape == b.shape == (64,) and not torch.equal(a, b)
    assert torch.equal(
        corpus_window(tok, 32, 42, corpus="python-docs"), b[32:]
    )  # windows are slices
    with pytest.raises(ValueError, match="unknown corpus 'news'; known: licenses, python-docs"):
        corpus_window(tok, 64, corpus="news")
    with pytest.raises(ValueError, match="corpus"):
        EvalConfig(corpus="news")


def test_leading_layers_join_the_unstable_budget():
    import torch

    from kvhead.core.stability import HeadProfile

    scores = torch.tensor([[0.1, 0.2], [0.3, 0.4], [0.9, 0.8], [0.7, 0.6]])
    profile = HeadProfile.from_scores(
        scores, fraction=0.5, model_fingerprint="x", page_size=4, top_k=2, window=4
    )
    assert profile.unstable_mask().nonzero().tolist() == [[2, 0], [2, 1], [3, 0], [3, 1]]
    lead = profile.unstable_mask(leading_layers=1)
    assert lead.sum() == 4  # same head budget
    assert lead.nonzero().tolist() == [[0, 0], [0, 1], [2, 0], [2, 1]]  # layer 3 gives way
    with pytest.raises(ValueError, match="leading_layers"):
        profile.unstable_mask(leading_layers=5)
    # a smaller count keeps the leading layers and then the most unstable of the rest
    assert profile.unstable_mask(1, count=3).nonzero().tolist() == [[0, 0], [0, 1], [2, 0]]
    assert profile.unstable_mask(count=1).nonzero().tolist() == [[2, 0]]
    for bad in (1, 5):  # below the leading layers' heads; beyond the ranked set
        with pytest.raises(ValueError, match="unstable head count"):
            profile.unstable_mask(1, count=bad)


def test_plus_modes_with_spec_options_match_the_spec_modes(tiny):
    from kvhead.eval.harness import SelectionOptions

    model_dir, runner, tok = tiny
    profile = profile_heads(runner, tok, model_dir, PROFILE)
    cfg = EvalConfig(
        contexts=[320],
        gen_tokens=12,
        top_k=4,
        page_size=8,
        rerank_interval=4,
        passkey_depths=[0.2],
        modes=["quest", "flexicache", "quest+", "flexicache+"],
    )
    (result,) = evaluate(runner, tok, profile, cfg, model="tiny").results
    assert result.modes["quest+"] == result.modes["quest"]
    assert result.modes["flexicache+"] == result.modes["flexicache"]
    wide = cfg.model_copy(
        update={
            "modes": ["flexicache+"],
            "options": SelectionOptions(
                sink_pages=1,
                recent_pages=2,
                group_score="softmax",
                leading_layers=1,
                unstable_dense=True,
            ),
        }
    )
    (plus,) = evaluate(runner, tok, profile, wide, model="tiny").results
    # layer 0 joins the unstable budget: as many heads resident, so about the same memory
    assert plus.modes["flexicache+"].resident_fraction == pytest.approx(
        result.modes["flexicache"].resident_fraction, abs=0.05
    )
    with pytest.raises(ValueError, match="modes"):
        EvalConfig(modes=["quest", "sparse"])


def test_coverage_curves_rise_to_one_and_drive_budgets(tiny):
    from kvhead.eval.harness import SelectionOptions
    from kvhead.eval.profiler import CoverageConfig, measure_coverage

    model_dir, runner, tok = tiny
    cov = measure_coverage(
        runner,
        tok,
        CoverageConfig(
            offsets=[0, 500],
            context=256,
            steps=6,
            step_pages=2,
            group_score="max",
            sink_pages=0,
            recent_pages=1,
        ),
    )
    mass = torch.tensor(cov.mass)
    assert cov.pages == list(range(2, 33, 2)) and mass.shape == (2, 2, 16)
    assert (
        (mass.diff(dim=-1) >= -1e-6).all()
        and (mass[..., -1] > 0.999).all()
        and (mass[..., 0] < 0.9).all()
    )

    profile = profile_heads(runner, tok, model_dir, PROFILE).model_copy(update={"coverage": cov})
    cfg = EvalConfig(
        contexts=[320],
        gen_tokens=12,
        top_k=4,
        page_size=8,
        rerank_interval=4,
        passkey_depths=[0.2],
        modes=["flexicache", "flexicache+"],
        prompts=2,
        options=SelectionOptions(head_budgets=True),
    )
    report = evaluate(runner, tok, profile, cfg, model="tiny")
    assert report.coverage == cov.model_dump(exclude={"mass"})  # which calibration set the budgets
    (result,) = report.results
    spec, adaptive = result.modes["flexicache"], result.modes["flexicache+"]
    assert spec.scored_tokens == adaptive.scored_tokens == 24
    p = spec.token_agreement
    assert spec.agreement_stderr == pytest.approx(math.sqrt(p * (1 - p) / 24))
    # pooled numbers are the per-window ones combined: agreement averaged, NLL averaged
    for m in (spec, adaptive):
        assert len(m.window_agreement) == len(m.window_perplexity_ratio) == 2
        assert m.token_agreement == pytest.approx(sum(m.window_agreement) / 2)
        assert m.perplexity_ratio == pytest.approx(math.prod(m.window_perplexity_ratio) ** 0.5)
        assert m.mean_kl == pytest.approx(sum(m.window_kl) / 2) and min(m.window_kl) >= 0
        assert (
            len(m.miss_margins) == round((1 - m.token_agreement) * 24)
            and min(m.miss_margins, default=0) >= 0
        )
    # same pool of pages for the stable heads: resident share within a page or two per step
    assert adaptive.resident_fraction == pytest.approx(spec.resident_fraction, abs=0.05)
    (later,) = evaluate(
        runner, tok, profile, cfg.model_copy(update={"prompts": 1, "first_window": 1}), model="tiny"
    ).results  # window 1 alone: the second window of the pooled run
    for mode, m in later.modes.items():
        assert m.window_agreement == result.modes[mode].window_agreement[1:]
        assert m.window_kl == pytest.approx(result.modes[mode].window_kl[1:])
    for differ in ({"sink_pages": 1}, {"bound_weight": 0.5}):  # curves ranked another way
        with pytest.raises(ValueError, match="options differ"):
            evaluate(
                runner,
                tok,
                profile,
                cfg.model_copy(update={"options": SelectionOptions(head_budgets=True, **differ)}),
                model="tiny",
            )
    with pytest.raises(ValueError, match="coverage"):
        evaluate(runner, tok, profile.model_copy(update={"coverage": None}), cfg, model="tiny")


def test_dense_heads_from_stale_coverage_spend_the_profiles_pages(tiny):
    from kvhead.eval.harness import SelectionOptions, coverage_dense_heads
    from kvhead.eval.profiler import CoverageConfig, measure_coverage

    model_dir, runner, tok = tiny
    calib = CoverageConfig(
        offsets=[0],
        context=256,
        steps=8,
        step_pages=2,
        group_score="max",
        sink_pages=0,
        recent_pages=1,
        rerank_interval=4,
    )
    cov = measure_coverage(runner, tok, calib)
    assert cov.rerank_interval == 4
    fresh = measure_coverage(runner, tok, calib.model_copy(update={"rerank_interval": 1}))
    docs = measure_coverage(runner, tok, calib.model_copy(update={"corpus": "python-docs"}))
    assert (cov.corpus, docs.corpus) == ("licenses", "python-docs") and docs.mass != cov.mass
    assert (
        torch.tensor(cov.mass)[..., -1].min() > 0.999
    )  # every page covers everything, stale or not
    assert cov.mass != fresh.mass  # three of every four steps score with an older ranking
    profile = profile_heads(runner, tok, model_dir, PROFILE).model_copy(update={"coverage": cov})
    opts = SelectionOptions(unstable_dense=True, head_budgets=True, dense_heads="coverage")
    cfg = EvalConfig(
        contexts=[256],
        gen_tokens=8,
        top_k=4,
        page_size=8,
        rerank_interval=4,
        passkey_depths=[],
        modes=["flexicache+"],
        options=opts,
    )
    dense, budgets = coverage_dense_heads(profile, cfg)
    # the pool of the profile's set: 2 heads x 32 pages + 2 heads x 4
    assert int(budgets[~dense].sum()) + int(dense.sum()) * 32 <= 2 * 32 + 2 * 4
    report = evaluate(runner, tok, profile, cfg, model="tiny")
    assert report.dense_heads == dense.nonzero().tolist()
    assert 0 < report.results[0].modes["flexicache+"].resident_fraction < 1
    with pytest.raises(ValueError, match="ranked every 2 steps"):
        coverage_dense_heads(profile, cfg.model_copy(update={"rerank_interval": 2}))
    for missing in ({"unstable_dense": False}, {"head_budgets": False}, {"leading_layers": 1}):
        with pytest.raises(ValueError, match="dense_heads=coverage"):
            EvalConfig(modes=["flexicache+"], options=opts.model_copy(update=missing))
