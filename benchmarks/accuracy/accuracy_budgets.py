"""What head-adaptive budgets buy in attention mass, from the committed profile's coverage curves.

No model is run: the profile (``kvhead coverage``, 2 calibration windows x 32 dense decode steps at
8k) holds, per (layer, kv head), the share of true attention mass that the softmax group score's
top-k pages cover (sink page and 4-page window first). For the stable heads of ``flexicache+``
(``leading_layers`` 0 and 2) this prints the mass covered with ``top_k`` pages each and with the
budgets of :func:`kvhead.core.budgets.allocate_budgets` at the same total, per layer, and writes
``benchmarks/results/accuracy/accuracy_budgets_alloc.json``. In-sample: the curves that set the
budgets also score them; the held-out test is ``kvhead eval --head-budgets``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root

import typer

from benchmarks.common import ACCURACY_RESULTS, PROFILE
from kvhead.core.budgets import allocate_budgets
from kvhead.core.stability import HeadProfile

app = typer.Typer(add_completion=False)


@app.command()
def main(
    profile: Path = PROFILE,
    top_k: int = 64,
    output: Path = ACCURACY_RESULTS / "accuracy_budgets_alloc.json",
) -> None:
    prof = HeadProfile.load(profile)
    if prof.coverage is None:
        raise typer.BadParameter(f"{profile} has no coverage; run `kvhead coverage` first")
    mass = prof.coverage.tensor()
    step = prof.coverage.pages[0]
    result: dict = {
        "profile": str(profile),
        "top_k": top_k,
        "coverage": prof.coverage.model_dump(exclude={"mass"}),
    }
    for lead in (0, 2):
        stable = ~prof.unstable_mask(lead)
        budgets = allocate_budgets(prof.coverage, stable, top_k)
        index = (budgets // step - 1).clamp_max(mass.shape[-1] - 1)
        adaptive = mass.gather(-1, index.unsqueeze(-1))[..., 0]
        uniform = mass[..., top_k // step - 1]
        row = {
            "stable_heads": int(stable.sum()),
            "pages": int(budgets[stable].sum()),
            "uniform_pages": int(stable.sum()) * top_k,
            "mean_mass": {
                "uniform": uniform[stable].mean().item(),
                "adaptive": adaptive[stable].mean().item(),
            },
            "worst_head_mass": {
                "uniform": uniform[stable].min().item(),
                "adaptive": adaptive[stable].min().item(),
            },
            "missed_mass_sum": {
                "uniform": (1 - uniform[stable]).sum().item(),
                "adaptive": (1 - adaptive[stable]).sum().item(),
            },
            "budgets": [
                [int(b) if s else None for b, s in zip(bl, sl)]
                for bl, sl in zip(budgets.tolist(), stable.tolist())
            ],
        }
        result[f"leading_layers_{lead}"] = row
        print(
            f"leading_layers={lead}: {row['stable_heads']} stable heads, {row['pages']} pages "
            f"(uniform {row['uniform_pages']}); mean mass {row['mean_mass']['uniform']:.4f} -> "
            f"{row['mean_mass']['adaptive']:.4f}, worst head "
            f"{row['worst_head_mass']['uniform']:.3f} -> "
            f"{row['worst_head_mass']['adaptive']:.3f}, missed mass "
            f"{row['missed_mass_sum']['uniform']:.2f} -> "
            f"{row['missed_mass_sum']['adaptive']:.2f}"
        )
    output.write_text(json.dumps(result, indent=1))
    print(f"wrote {output}")


if __name__ == "__main__":
    app()
