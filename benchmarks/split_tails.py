"""How much of a realized-FPR miss the semi protocol's own split makes, with no model involved.

    python -m benchmarks.split_tails [--datasets satimage-2 pendigits] [--seeds 20] [--target 0.01]

The semi protocol trains and calibrates on a random half of the normal rows and tests on the
other half (``quality.make_split``). Conformal calibration is exact over all such splits, but one
split can put more of the dataset's unusual normal rows in one half than in the other, and no
calibration drawn from the train half can see that.

To measure it apart from any model, each normal row gets a score fixed before the split: its
distance to its 5th nearest other normal row, and its Mahalanobis distance, both over all normal
rows in robust units (median, IQR / 1.349). Per seed, the threshold is the conformal one ranked
on the whole train half (k = floor(target (n + 1)), n = half the normal rows), and the realized
FPR is measured on the test half of the same split. What it prints is the split's share of a
miss: a model calibrated on a part of the train half adds its calibration draw's spread
(``benchmarks.conformal_spread``) on top.
"""

from __future__ import annotations

import argparse

import numpy as np

from benchmarks.quality import available_datasets, load_dataset, make_split
from pipeline.calibrate import calibrate

LARGE_DATASETS = ("cover", "shuttle", "magic.gamma", "mammography", "pendigits", "annthyroid",
                  "satimage-2", "wilt")  # those with at least 2,000 test normal rows
NEIGHBOURS = 5


def robust_units(X: np.ndarray) -> np.ndarray:
    median = np.median(X, axis=0)
    scale = np.subtract(*np.percentile(X, [75, 25], axis=0)) / 1.349
    return (X - median) / np.where(scale > 0, scale, 1.0)


def fixed_scores(normal: np.ndarray) -> dict[str, np.ndarray]:
    """Scores of the normal rows that no split changes (higher = more unusual)."""
    from sklearn.neighbors import NearestNeighbors  # PyOD's dependency: the test extra

    Z = robust_units(normal.astype(np.float64))
    distances, _ = NearestNeighbors(n_neighbors=NEIGHBOURS + 1).fit(Z).kneighbors(Z)
    centred = Z - Z.mean(axis=0)
    precision = np.linalg.pinv(np.cov(centred, rowvar=False))
    mahalanobis = np.einsum("ij,jk,ik->i", centred, precision, centred)
    return {f"{NEIGHBOURS}-NN distance": distances[:, NEIGHBOURS], "Mahalanobis": mahalanobis}


def realized_rates(normal_scores: np.ndarray, y: np.ndarray, seeds: int, target: float) -> np.ndarray:
    """Realized FPR on the test half, per seed, of the conformal threshold ranked on the train half.

    ``normal_scores`` holds one score per normal row of ``y``, in row order.
    """
    position = np.full(len(y), -1)
    position[y == 0] = np.arange(int((y == 0).sum()))
    rates = []
    for seed in range(seeds):
        split = make_split(y, "semi", seed)
        # The pipeline's own rule, in its float32: the k-th largest, k = floor(target (n + 1)).
        threshold = calibrate(normal_scores[position[split.train]], target).threshold
        test = normal_scores[position[split.test[split.test_labels == 0]]].astype(np.float32)
        rates.append(float((test > np.float32(threshold)).mean()))
    return np.array(rates)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.split_tails", description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=list(LARGE_DATASETS))
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--target", type=float, default=0.01)
    args = parser.parse_args(argv)
    found = available_datasets()
    missing = [name for name in args.datasets if name not in found]
    if missing:
        raise SystemExit(f"error: no dataset {', '.join(missing)} in {next(iter(found.values())).parent}; "
                         f"expected one of {', '.join(sorted(found))}")
    first = min(5, args.seeds)
    print(f"Realized FPR (%) at target {args.target:.2%}, threshold ranked on the whole train half; "
          f"relative error in brackets")
    print(f"| dataset | score | train-half rows | seeds 0-{first - 1}, each | mean of seeds 0-{first - 1} "
          f"| mean of seeds {first}-{args.seeds - 1} | mean of all {args.seeds} |")
    print("|---|---|---|---|---|---|---|")
    for name in args.datasets:
        X, y = load_dataset(found[name])
        for label, scores in fixed_scores(X[y == 0]).items():
            rates = realized_rates(scores, y, args.seeds, args.target) * 100
            target = args.target * 100

            def cell(values: np.ndarray) -> str:
                return f"{values.mean():.2f} ({values.mean() / target - 1:+.0%})" if len(values) else "-"

            each = ", ".join(f"{r:.2f}" for r in rates[:first])
            print(f"| {name} | {label} | {int((y == 0).sum()) // 2:,} | {each} | {cell(rates[:first])} "
                  f"| {cell(rates[first:])} | {cell(rates)} |", flush=True)


if __name__ == "__main__":
    main()
