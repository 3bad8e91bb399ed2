"""Figure builders for the HTML reports: each returns a Matplotlib Figure, ``png_bytes`` renders one.

Figures are built from ``matplotlib.figure.Figure`` directly, never through pyplot, so no global
figure registry holds them (nothing to close, nothing leaks between calls or threads) and tests can
read the artists back. Curves and projections are computed in NumPy so the module needs neither
scikit-learn nor torch.
"""

from __future__ import annotations

import io

import matplotlib

# Reports are rendered on servers and in workers without a display.
matplotlib.use("Agg")

import numpy as np  # noqa: E402
from matplotlib.colors import LogNorm, Normalize  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from pipeline.metrics import auprc, auroc  # noqa: E402

# Scatter plots beyond this many points are slow to render and no more readable.
MAX_POINTS = 5000
# A score range wider than this ratio reads better on a log axis (reconstruction errors are heavy-tailed).
LOG_SPAN = 100.0
HIST_BINS = 60


def png_bytes(figure: Figure, dpi: int = 110) -> bytes:
    """The figure as PNG bytes; the figure stays open (it is not registered anywhere to close)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def loss_curves(history: list[dict], best_epoch: int | None = None) -> Figure:
    """Training and validation reconstruction and KL per epoch, with the kept epoch marked.

    ``best_epoch``: the epoch training kept (early stopping uses a small tolerance, so it can
    differ from the plain argmin); by default the lowest val_loss.
    """
    if not history:
        raise ValueError("loss_curves needs at least one epoch of history")
    epochs = np.array([entry["epoch"] for entry in history])
    val_loss = np.array([entry["val_loss"] for entry in history], dtype=np.float64)
    if best_epoch is None:
        # nanargmin: a diverged epoch (NaN loss) must not be marked as the best one.
        best_epoch = epochs[int(np.nanargmin(val_loss))] if np.isfinite(val_loss).any() else epochs[0]

    figure = Figure(figsize=(10, 3.8), layout="constrained")
    recon_ax, kl_ax = figure.subplots(1, 2)
    for ax, key, title in ((recon_ax, "recon", "Reconstruction"), (kl_ax, "kl", "KL")):
        ax.plot(epochs, [entry[f"train_{key}"] for entry in history], label=f"train {key}")
        ax.plot(epochs, [entry[f"val_{key}"] for entry in history], label=f"validation {key}")
        ax.axvline(best_epoch, color="grey", linestyle=":", label=f"best epoch {best_epoch}")
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.set_ylabel("loss per row")
        ax.legend()
    return figure


def score_histogram(
    calibration_scores: np.ndarray,
    threshold: float,
    target_fpr: float,
    scored: np.ndarray | None = None,
) -> Figure:
    """Calibration score density, optionally the scored batch over the same bins, and the threshold."""
    calibration = _finite(calibration_scores)
    if calibration.size == 0:
        raise ValueError("score_histogram needs at least one finite calibration score")
    batch = _finite(scored) if scored is not None else None
    data = calibration if batch is None or batch.size == 0 else np.concatenate([calibration, batch])

    log_x = bool(data.min() > 0 and threshold > 0 and data.max() / data.min() > LOG_SPAN)
    low = min(float(data.min()), float(threshold))
    # One far outlier would squash every other bar against the axis: view up to the 99.9th
    # percentile, but always far enough right to show the threshold.
    high = max(float(np.percentile(data, 99.9)), float(threshold))
    if high <= low:  # all scores equal: give the bins some width
        high = low * 10.0 if log_x else low + max(abs(low), 1.0)
    bins = np.geomspace(low, high, HIST_BINS + 1) if log_x else np.linspace(low, high, HIST_BINS + 1)

    figure = Figure(figsize=(8, 4), layout="constrained")
    ax = figure.subplots()
    # Density by explicit weights rather than density=True: on a log axis it is per decade (per unit
    # of x would make the narrow low bins spike), and dividing by all rows, not just those in view,
    # keeps the clipped tail from inflating the bars.
    bin_width = np.log10(high / low) / HIST_BINS if log_x else (high - low) / HIST_BINS
    ax.hist(calibration, bins=bins, weights=np.full(calibration.size, 1.0 / (calibration.size * bin_width)),
            alpha=0.6, color="tab:blue", label=f"calibration ({calibration.size:,} normal rows)")
    if batch is not None and batch.size:
        ax.hist(batch, bins=bins, weights=np.full(batch.size, 1.0 / (batch.size * bin_width)), histtype="step",
                linewidth=1.5, color="tab:orange", label=f"scored batch ({batch.size:,} rows)")
    ax.axvline(threshold, color="red", linewidth=1.5,
               label=f"threshold {threshold:.4g} (target FPR {target_fpr:.2%})")
    if log_x:
        ax.set_xscale("log")
        ax.set_xlim(low / 1.05, high * 1.05)
    else:
        margin = 0.02 * (high - low)
        ax.set_xlim(low - margin, high + margin)
    beyond = int((data > high).sum())
    if beyond:
        # Say what the clipped view hides rather than drop it silently.
        ax.text(0.99, 0.98, f"{beyond:,} score{'s' if beyond > 1 else ''} beyond the view (max {data.max():.4g})",
                transform=ax.transAxes, ha="right", va="top", fontsize=8)
    ax.set_title("Anomaly scores")
    ax.set_xlabel("score (log scale)" if log_x else "score")
    ax.set_ylabel("density per decade" if log_x else "density")
    ax.legend(loc="upper right", bbox_to_anchor=(1.0, 0.92) if beyond else (1.0, 1.0))
    return figure


def roc_curve(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, TPR) from (0, 0) to (1, 1), one point per distinct score, highest scores first."""
    hits, sorted_scores, n_pos, n_neg = _ranked(labels, scores)
    true_pos, predicted = _counts_at_distinct_scores(hits, sorted_scores)
    false_pos = predicted - true_pos
    return np.r_[0.0, false_pos / n_neg], np.r_[0.0, true_pos / n_pos]


def pr_curve(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(recall, precision), one point per distinct score, highest scores first."""
    hits, sorted_scores, n_pos, _ = _ranked(labels, scores)
    true_pos, predicted = _counts_at_distinct_scores(hits, sorted_scores)
    return true_pos / n_pos, true_pos / predicted


def roc_pr_curves(labels: np.ndarray, scores: np.ndarray) -> Figure:
    """ROC and precision-recall curves, titled with AUROC and AUPRC as pipeline.metrics computes them."""
    fpr, tpr = roc_curve(labels, scores)
    recall, precision = pr_curve(labels, scores)
    anomaly_share = float(np.asarray(labels).astype(bool).mean())

    figure = Figure(figsize=(10, 4.2), layout="constrained")
    roc_ax, pr_ax = figure.subplots(1, 2)
    roc_ax.plot(fpr, tpr, color="tab:blue", label="model")
    roc_ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="chance")
    roc_ax.set_title(f"ROC, AUROC {auroc(labels, scores):.4f}")
    roc_ax.set_xlabel("false-positive rate")
    roc_ax.set_ylabel("true-positive rate")

    # Steps "pre": precision P_k holds over the recall step (R_{k-1}, R_k], the area AUPRC sums.
    pr_ax.step(np.r_[0.0, recall], np.r_[precision[0], precision], where="pre", color="tab:blue", label="model")
    pr_ax.axhline(anomaly_share, color="grey", linestyle="--", linewidth=1,
                  label=f"anomaly share {anomaly_share:.2%}")
    pr_ax.set_title(f"Precision-recall, AUPRC {auprc(labels, scores):.4f}")
    pr_ax.set_xlabel("recall")
    pr_ax.set_ylabel("precision")
    for ax in (roc_ax, pr_ax):
        ax.set_xlim(-0.01, 1.01)
        ax.set_ylim(-0.01, 1.01)
        ax.legend(loc="lower right" if ax is roc_ax else "upper right")
    return figure


def latent_projection(mu: np.ndarray, scores: np.ndarray, labels: np.ndarray | None = None) -> Figure:
    """The latent means on their first two principal components, coloured by score (and by label if given)."""
    mu = np.asarray(mu, dtype=np.float64)
    if mu.ndim == 1:
        mu = mu[:, None]
    scores = np.asarray(scores, dtype=np.float64)
    if mu.ndim != 2 or len(mu) != len(scores) or len(mu) == 0:
        raise ValueError(f"mu must be [rows, latent] with one score per row, got {mu.shape} and {scores.shape}")
    if labels is not None:
        labels = np.asarray(labels).astype(bool)
        if len(labels) != len(mu):
            raise ValueError(f"{len(labels)} labels for {len(mu)} rows")

    total = len(mu)
    if total > MAX_POINTS:
        # Fixed seed: the same report from the same data draws the same points.
        keep = np.sort(np.random.default_rng(0).choice(total, size=MAX_POINTS, replace=False))
        mu, scores = mu[keep], scores[keep]
        labels = labels[keep] if labels is not None else None
    # The PCA is fitted on the shown sample: 5,000 rows estimate the directions well and bound the cost.
    coords, variance_share = _pca_2d(mu)

    n_axes = 1 if labels is None else 2
    figure = Figure(figsize=(5.5 * n_axes, 4.6), layout="constrained")
    axes = figure.subplots(1, n_axes, squeeze=False)[0]

    finite = np.isfinite(scores)
    positive = scores[finite & (scores > 0)]
    log_colour = bool(finite.any() and positive.size == finite.sum() and positive.max() / positive.min() > LOG_SPAN)
    norm = LogNorm() if log_colour else Normalize()
    order = np.argsort(scores, kind="mergesort")  # highest scores drawn last, on top
    points = axes[0].scatter(coords[order, 0], coords[order, 1], c=scores[order], cmap="viridis", norm=norm,
                             s=8, linewidths=0)
    figure.colorbar(points, ax=axes[0], label="score")
    axes[0].set_title("Latent means by score")

    if labels is not None:
        label_ax = axes[1]
        for flag, colour, name in ((False, "lightgrey", "normal"), (True, "red", "anomaly")):
            chosen = labels == flag  # anomalies second, so drawn over the normal rows
            label_ax.scatter(coords[chosen, 0], coords[chosen, 1], color=colour, s=8, linewidths=0,
                             label=f"{name} ({int(chosen.sum()):,})")
        label_ax.set_title("Latent means by label")
        label_ax.legend()

    for ax in axes:
        ax.set_xlabel(f"PC 1 ({variance_share[0]:.0%} var)")
        ax.set_ylabel(f"PC 2 ({variance_share[1]:.0%} var)")
    if total > MAX_POINTS:
        figure.suptitle(f"{MAX_POINTS:,} of {total:,} rows shown", fontsize=9)
    return figure


def feature_contributions(contributions: np.ndarray, feature_names: list[str], top: int = 15) -> Figure:
    """Mean share of reconstruction error per feature over the flagged rows, the `top` largest, largest on top."""
    contributions = np.asarray(contributions, dtype=np.float64)
    if contributions.ndim != 2 or contributions.shape[1] != len(feature_names) or len(contributions) == 0:
        raise ValueError(f"contributions must be [rows, {len(feature_names)} features] with at least one row, "
                         f"got {contributions.shape}")
    means = np.nanmean(contributions, axis=0)
    # Stable sort on the negated means: ties keep the column order, so the chart is reproducible.
    chosen = np.argsort(-means, kind="mergesort")[: max(int(top), 1)]

    figure = Figure(figsize=(7, 0.35 * len(chosen) + 1.4), layout="constrained")
    ax = figure.subplots()
    positions = np.arange(len(chosen))
    ax.barh(positions, means[chosen], color="tab:red")
    # Column names are data, not mathtext: "cost_$_per_$_unit" would otherwise fail to render.
    ax.set_yticks(positions, [feature_names[i] for i in chosen], parse_math=False)
    ax.invert_yaxis()  # first bar (the largest) at the top
    ax.set_title("What drives the top anomalies")
    ax.set_xlabel("mean share of reconstruction error")
    return figure


def image_grid(images: np.ndarray, reconstructions: np.ndarray, maps: np.ndarray, titles: list[str]) -> Figure:
    """One row per image: the image, its reconstruction and its error map, all maps on one colour scale."""
    images, reconstructions, maps = np.asarray(images), np.asarray(reconstructions), np.asarray(maps)
    n = len(images)
    if n == 0 or images.ndim != 4 or images.shape != reconstructions.shape or maps.ndim != 3:
        raise ValueError(f"images and reconstructions must be [n, C, H, W] alike and maps [n, H, W], got "
                         f"{images.shape}, {reconstructions.shape}, {maps.shape}")
    if len(maps) != n or len(titles) != n:
        raise ValueError(f"{n} images need {n} maps and {n} titles, got {len(maps)} and {len(titles)}")

    # One scale for every map, from zero, so a brighter map really means a larger error.
    vmax = float(np.nanmax(maps))
    vmax = vmax if np.isfinite(vmax) and vmax > 0 else 1.0
    figure = Figure(figsize=(7.5, 2.4 * n), layout="constrained")
    axes = figure.subplots(n, 3, squeeze=False)
    heat = None
    for row in range(n):
        for col, picture in enumerate((images[row], reconstructions[row])):
            _show_image(axes[row, col], picture)
        heat = axes[row, 2].imshow(maps[row], cmap="inferno", vmin=0.0, vmax=vmax)
        axes[row, 0].set_title(titles[row], fontsize=9, parse_math=False)  # titles hold file names, not mathtext
        for ax in axes[row]:
            ax.set_axis_off()
    axes[0, 1].set_title("reconstruction", fontsize=9)
    axes[0, 2].set_title("error map", fontsize=9)
    figure.colorbar(heat, ax=axes[:, 2], shrink=0.8 if n > 1 else 1.0, label="error")
    return figure


def _show_image(ax, picture: np.ndarray) -> None:
    """A [C, H, W] image in [0, 1]: grey for one channel, RGB for three."""
    picture = np.clip(np.asarray(picture, dtype=np.float64), 0.0, 1.0)
    if picture.shape[0] == 1:
        ax.imshow(picture[0], cmap="gray", vmin=0.0, vmax=1.0)
    elif picture.shape[0] == 3:
        ax.imshow(np.transpose(picture, (1, 2, 0)))
    else:
        raise ValueError(f"images need 1 or 3 channels, got {picture.shape[0]}")


def _finite(values: np.ndarray) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64).ravel()
    return values[np.isfinite(values)]


def _ranked(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Labels and scores sorted by score, highest first, with the class counts; both classes required."""
    labels = np.asarray(labels).astype(bool).ravel()
    scores = np.asarray(scores, dtype=np.float64).ravel()
    if len(labels) != len(scores):
        raise ValueError(f"{len(labels)} labels for {len(scores)} scores")
    n_pos = int(labels.sum())
    n_neg = len(labels) - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError("ROC and precision-recall curves need both normal and anomalous labelled rows")
    order = np.argsort(-scores, kind="mergesort")
    return labels[order], scores[order], n_pos, n_neg


def _counts_at_distinct_scores(hits: np.ndarray, sorted_scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """True positives and rows flagged at each distinct threshold (the last row of each tie group)."""
    last_of_group = np.r_[sorted_scores[1:] != sorted_scores[:-1], True]
    true_pos = np.cumsum(hits)[last_of_group].astype(np.float64)
    predicted = (np.arange(len(hits)) + 1)[last_of_group].astype(np.float64)
    return true_pos, predicted


def _pca_2d(mu: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows projected on the first two principal components, and each component's share of the variance."""
    centred = mu - mu.mean(axis=0)
    _, singular, components = np.linalg.svd(centred, full_matrices=False)
    # SVD signs are arbitrary: make each component's largest loading positive so reruns look the same.
    signs = np.sign(components[np.arange(len(components)), np.abs(components).argmax(axis=1)])
    components = components * np.where(signs == 0, 1.0, signs)[:, None]
    variance = singular**2
    share = variance / variance.sum() if variance.sum() > 0 else np.zeros_like(variance)
    coords = centred @ components[:2].T
    if coords.shape[1] == 1:  # a one-dimensional latent: plot it against zeros
        coords = np.column_stack([coords[:, 0], np.zeros(len(coords))])
        share = np.r_[share, 0.0]
    return coords, share[:2]
