"""How far an exact conformal threshold's realized FPR strays by chance alone, at given sizes.

    python -m benchmarks.conformal_spread runs/bench/quality.json [--target 0.01] [--seeds 5]

For each dataset of a quality run with at least 2,000 test normal rows, it takes ours' calibration
size n and test normal count m from the run, and draws what a perfectly exchangeable conformal
threshold gives: the threshold's true exceedance rate is Beta(k, n + 1 - k) with
k = floor(target (n + 1)), and the realized rate is a Binomial(m, that rate) / m. It prints the
spread of one seed's realized rate and the chance that the mean over ``--seeds`` seeds misses
the target by more than ``--tolerance`` (30%), on each dataset and on any of them. No model is
involved: this is the floor any calibration on n held-out rows shares.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np

from benchmarks.quality import LARGE_TEST_NORMAL

DRAWS = 200_000


def sizes_from_run(result: dict, target: float) -> dict[str, tuple[int, int]]:
    """(calibration rows, test normal rows) of ours per dataset, for datasets with enough test normals."""
    sizes = {}
    for entry in result["calibration"]:
        if entry["method"] == "ours" and entry["target_fpr"] == target and entry.get("n_calibration"):
            if entry["n_test_normal"] >= LARGE_TEST_NORMAL:
                sizes[entry["dataset"]] = (int(entry["n_calibration"]), int(entry["n_test_normal"]))
    return sizes


def miss_chance(n: int, m: int, target: float, seeds: int, tolerance: float, rng: np.random.Generator):
    """One seed's relative spread, and for each draw whether the mean over ``seeds`` seeds misses."""
    k = math.floor(target * (n + 1) + 1e-9)
    rate = rng.beta(k, n + 1 - k, size=(DRAWS, seeds))
    realized = rng.binomial(m, rate) / m
    missed = np.abs(realized.mean(axis=1) / target - 1) > tolerance
    return k, float(realized.std() / target), missed


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.conformal_spread", description=__doc__.splitlines()[0])
    parser.add_argument("result", type=Path, help="a benchmarks.quality result JSON (semi protocol, with ours)")
    parser.add_argument("--target", type=float, default=0.01)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--tolerance", type=float, default=0.3)
    args = parser.parse_args(argv)
    sizes = sizes_from_run(json.loads(args.result.read_text()), args.target)
    if not sizes:
        raise SystemExit(f"error: {args.result} has no ours calibration entries at target {args.target} "
                         f"on datasets with at least {LARGE_TEST_NORMAL} test normal rows")
    rng = np.random.default_rng(0)
    any_missed = np.zeros(DRAWS, dtype=bool)
    print(f"| dataset | calibration rows | k | test normal rows | one seed's spread (sd / target) "
          f"| P(mean of {args.seeds} seeds off by > {args.tolerance:.0%}) |")
    print("|---|---|---|---|---|---|")
    for dataset, (n, m) in sorted(sizes.items(), key=lambda item: -item[1][0]):
        k, spread, missed = miss_chance(n, m, args.target, args.seeds, args.tolerance, rng)
        any_missed |= missed
        print(f"| {dataset} | {n:,} | {k} | {m:,} | ±{spread:.0%} | {missed.mean():.1%} |")
    print(f"\nP(at least one of the {len(sizes)} off by more than {args.tolerance:.0%}) = {any_missed.mean():.1%} "
          f"({DRAWS:,} draws, seed 0)")


if __name__ == "__main__":
    main()
