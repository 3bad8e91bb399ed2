"""The report figures: what each one draws (data, labels, scales), not just that it renders."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib.collections import PathCollection
from matplotlib.container import BarContainer
from matplotlib.figure import Figure
from matplotlib.image import AxesImage
from matplotlib.patches import Polygon

from pipeline import plots
from pipeline.metrics import auprc, auroc

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def plot_axes(figure: Figure) -> list:
    """The figure's axes without the colorbars."""
    return [ax for ax in figure.axes if ax.get_label() != "<colorbar>"]


def line(ax, label: str):
    matches = [item for item in ax.get_lines() if item.get_label() == label]
    assert len(matches) == 1, f"expected one line labelled {label!r}, got {[l.get_label() for l in ax.get_lines()]}"
    return matches[0]


def vertical_lines(ax) -> list:
    return [item for item in ax.get_lines() if len(set(np.asarray(item.get_xdata(), dtype=float))) == 1
            and len(item.get_xdata()) == 2]


HISTORY = [
    {"epoch": e, "train_recon": 10.0 / e, "train_kl": 0.5 + 0.1 * e, "val_recon": 12.0 / e + 0.2 * e,
     "val_kl": 0.6 + 0.1 * e, "val_loss": v}
    for e, v in zip(range(1, 7), [9.0, 5.0, 3.0, 2.5, 2.8, 3.1])
]


def test_loss_curves_lines_and_best_epoch():
    figure = plots.loss_curves(HISTORY)
    recon_ax, kl_ax = plot_axes(figure)
    assert recon_ax.get_title() == "Reconstruction" and kl_ax.get_title() == "KL"
    epochs = [h["epoch"] for h in HISTORY]
    for ax, key in ((recon_ax, "recon"), (kl_ax, "kl")):
        for prefix, source in (("train", "train"), ("validation", "val")):
            drawn = line(ax, f"{prefix} {key}")
            np.testing.assert_allclose(drawn.get_xdata(), epochs)
            np.testing.assert_allclose(drawn.get_ydata(), [h[f"{source}_{key}"] for h in HISTORY])
        (best,) = vertical_lines(ax)
        np.testing.assert_allclose(best.get_xdata(), [4, 4])  # argmin of val_loss is the 4th entry, epoch 4
        assert best.get_linestyle() == ":"
        assert ax.get_legend() is not None


def test_loss_curves_rejects_empty_history():
    with pytest.raises(ValueError):
        plots.loss_curves([])


def threshold_line(ax):
    matches = [item for item in ax.get_lines() if item.get_label().startswith("threshold ")]
    assert len(matches) == 1
    return matches[0]


def test_score_histogram_threshold_line_and_label():
    scores = np.random.default_rng(1).normal(10.0, 1.0, 2000)
    figure = plots.score_histogram(scores, threshold=12.5, target_fpr=0.01)
    (ax,) = plot_axes(figure)
    drawn = threshold_line(ax)
    np.testing.assert_allclose(drawn.get_xdata(), [12.5, 12.5])
    assert drawn.get_label() == "threshold 12.5 (target FPR 1.00%)"
    assert drawn.get_color() == "red"
    assert ax.get_xscale() == "linear"
    assert len(ax.containers) == 1 and not any(isinstance(p, Polygon) for p in ax.patches)
    low, high = ax.get_xlim()
    assert low <= scores.min() and high >= 12.5
    # A density: the bars' area is the share of rows in view (all but the clipped top 0.1%).
    area = sum(bar.get_width() * bar.get_height() for bar in ax.containers[0])
    assert 0.99 <= area <= 1.0 + 1e-9


def test_score_histogram_with_scored_batch_draws_two_histograms_on_shared_bins():
    rng = np.random.default_rng(2)
    calibration, batch = rng.normal(10.0, 1.0, 1000), rng.normal(11.0, 1.5, 500)
    (ax,) = plot_axes(plots.score_histogram(calibration, 12.0, 0.05, scored=batch))
    bars = [c for c in ax.containers if isinstance(c, BarContainer)]
    outlines = [p for p in ax.patches if isinstance(p, Polygon)]
    assert len(bars) == 1 and len(outlines) == 1
    # The step outline's x vertices are the same bin edges as the bars.
    edges = sorted({round(r.get_x(), 9) for r in bars[0]} | {round(bars[0][-1].get_x() + bars[0][-1].get_width(), 9)})
    outline_x = sorted({round(x, 9) for x in outlines[0].get_xy()[:, 0]})
    np.testing.assert_allclose(outline_x, edges)


def test_score_histogram_log_axis_only_for_heavy_tailed_positive_scores():
    rng = np.random.default_rng(3)
    heavy = rng.lognormal(0.0, 2.0, 3000)  # spans several orders of magnitude
    assert heavy.max() / heavy.min() > 100
    (ax,) = plot_axes(plots.score_histogram(heavy, float(np.quantile(heavy, 0.99)), 0.01))
    assert ax.get_xscale() == "log"
    assert ax.get_ylabel() == "density per decade"
    decades = sum(np.log10((b.get_x() + b.get_width()) / b.get_x()) * b.get_height() for b in ax.containers[0])
    assert 0.99 <= decades <= 1.0 + 1e-9
    normal = rng.normal(5.0, 1.0, 3000)
    (ax,) = plot_axes(plots.score_histogram(normal, 8.0, 0.01))
    assert ax.get_xscale() == "linear"
    # Positive but narrow: still linear.
    (ax,) = plot_axes(plots.score_histogram(np.abs(normal) + 1.0, 8.0, 0.01))
    assert ax.get_xscale() == "linear"


def test_score_histogram_clips_the_view_but_keeps_the_threshold():
    scores = np.r_[np.random.default_rng(4).normal(10.0, 1.0, 5000), 1e6]
    (ax,) = plot_axes(plots.score_histogram(scores, 13.0, 0.01))
    low, high = ax.get_xlim()
    assert 13.0 <= high < 100.0  # the 1e6 outlier does not set the view
    assert any("beyond the view" in text.get_text() for text in ax.texts)
    # A threshold above the 99.9th percentile still shows.
    (ax,) = plot_axes(plots.score_histogram(scores[:-1], 50.0, 0.01))
    assert ax.get_xlim()[1] >= 50.0


def test_roc_pr_titles_match_metrics_and_curve_ends_at_one():
    labels = np.array([0, 1, 0, 1, 0, 0, 1, 0])
    scores = np.array([0.1, 0.8, 0.4, 0.35, 0.2, 0.9, 0.7, 0.3])
    roc_ax, pr_ax = plot_axes(plots.roc_pr_curves(labels, scores))
    assert roc_ax.get_title() == f"ROC, AUROC {auroc(labels, scores):.4f}"
    assert pr_ax.get_title() == f"Precision-recall, AUPRC {auprc(labels, scores):.4f}"
    curve = line(roc_ax, "model")
    assert (curve.get_xdata()[0], curve.get_ydata()[0]) == (0.0, 0.0)
    assert (curve.get_xdata()[-1], curve.get_ydata()[-1]) == (1.0, 1.0)
    assert np.all(np.diff(curve.get_xdata()) >= 0) and np.all(np.diff(curve.get_ydata()) >= 0)
    share = line(pr_ax, "anomaly share 37.50%")
    np.testing.assert_allclose(share.get_ydata(), [3 / 8, 3 / 8])


def test_curves_have_one_point_per_distinct_score_and_match_auroc():
    rng = np.random.default_rng(5)
    labels = rng.random(400) < 0.2
    scores = np.round(rng.normal(labels * 1.0, 1.0), 1)  # rounded: many ties
    fpr, tpr = plots.roc_curve(labels, scores)
    assert len(fpr) == len(np.unique(scores)) + 1
    assert np.trapezoid(tpr, fpr) == pytest.approx(auroc(labels, scores))  # ties interpolate as "count half"
    recall, precision = plots.pr_curve(labels, scores)
    assert np.sum(np.diff(np.r_[0.0, recall]) * precision) == pytest.approx(auprc(labels, scores))


def test_roc_perfect_separation():
    labels = np.array([0, 0, 0, 1, 1])
    roc_ax, pr_ax = plot_axes(plots.roc_pr_curves(labels, np.array([0.1, 0.2, 0.3, 5.0, 6.0])))
    assert roc_ax.get_title() == "ROC, AUROC 1.0000"
    assert pr_ax.get_title() == "Precision-recall, AUPRC 1.0000"


def test_roc_needs_both_classes():
    with pytest.raises(ValueError, match="both"):
        plots.roc_pr_curves(np.zeros(5), np.arange(5.0))


def scatters(ax) -> list[PathCollection]:
    return [c for c in ax.collections if isinstance(c, PathCollection)]


def test_latent_projection_variance_in_one_direction():
    rng = np.random.default_rng(6)
    direction = np.array([3.0, -1.0, 2.0, 0.5]) / np.linalg.norm([3.0, -1.0, 2.0, 0.5])
    mu = rng.normal(0, 10.0, (500, 1)) * direction + rng.normal(0, 0.5, (500, 4))
    scores = rng.lognormal(0, 0.5, 500)
    figure = plots.latent_projection(mu, scores)
    (ax,) = plot_axes(figure)
    share = float(ax.get_xlabel().removeprefix("PC 1 (").removesuffix("% var)"))
    assert share > 90
    assert ax.get_ylabel().startswith("PC 2 (") and ax.get_ylabel().endswith("% var)")
    assert any(cb.get_label() == "<colorbar>" and cb.get_ylabel() == "score" for cb in figure.axes)
    (points,) = scatters(ax)
    assert len(points.get_offsets()) == 500
    assert type(points.norm).__name__ == "Normalize"  # scores span < 100x: linear colours


def test_latent_projection_labels_add_second_axes_and_log_colours():
    rng = np.random.default_rng(7)
    mu = rng.normal(size=(300, 3))
    labels = np.arange(300) % 10 == 0
    scores = np.where(labels, 1e4, 1.0) * rng.uniform(1, 2, 300)
    score_ax, label_ax = plot_axes(plots.latent_projection(mu, scores, labels))
    assert type(scatters(score_ax)[0].norm).__name__ == "LogNorm"
    legend = [t.get_text() for t in label_ax.get_legend().get_texts()]
    assert legend == ["normal (270)", "anomaly (30)"]
    assert [len(s.get_offsets()) for s in scatters(label_ax)] == [270, 30]


def test_latent_projection_subsamples_deterministically():
    rng = np.random.default_rng(8)
    mu, scores = rng.normal(size=(6000, 3)), rng.uniform(1, 2, 6000)
    (first,) = scatters(plot_axes(plots.latent_projection(mu, scores))[0])
    (second,) = scatters(plot_axes(plots.latent_projection(mu, scores))[0])
    assert len(first.get_offsets()) == plots.MAX_POINTS == 5000
    np.testing.assert_array_equal(first.get_offsets(), second.get_offsets())


def test_latent_projection_one_dimensional_latent():
    mu = np.linspace(-1, 1, 50)[:, None]
    (ax,) = plot_axes(plots.latent_projection(mu, np.ones(50)))
    (points,) = scatters(ax)
    np.testing.assert_array_equal(points.get_offsets()[:, 1], 0.0)
    assert ax.get_xlabel() == "PC 1 (100% var)"


def test_feature_contributions_top_features_largest_first():
    rng = np.random.default_rng(9)
    means = np.array([0.05, 0.30, 0.01, 0.20, 0.10, 0.02, 0.25, 0.07])
    contributions = rng.uniform(0.5, 1.5, (40, 8)) * means
    names = [f"f{i}" for i in range(8)]
    (ax,) = plot_axes(plots.feature_contributions(contributions, names, top=5))
    expected = [names[i] for i in np.argsort(-contributions.mean(axis=0))[:5]]
    assert expected[:3] == ["f1", "f6", "f3"]
    # Ticks sit at 0..4 on an inverted axis: the first label is the top bar.
    assert ax.yaxis_inverted()
    assert [t.get_text() for t in ax.get_yticklabels()] == expected
    widths = [bar.get_width() for bar in ax.containers[0]]
    np.testing.assert_allclose(widths, np.sort(contributions.mean(axis=0))[::-1][:5])
    assert ax.get_title() == "What drives the top anomalies"
    assert ax.get_xlabel() == "mean share of reconstruction error"


def test_feature_contributions_rejects_mismatched_names():
    with pytest.raises(ValueError):
        plots.feature_contributions(np.ones((3, 4)), ["a", "b"])


@pytest.mark.parametrize("channels", [1, 3])
def test_image_grid_layout_and_shared_map_scale(channels):
    rng = np.random.default_rng(10)
    n = 3
    images = rng.random((n, channels, 8, 8))
    maps = rng.random((n, 8, 8)) * np.array([1.0, 5.0, 2.0])[:, None, None]
    figure = plots.image_grid(images, images * 0.9, maps, [f"score {s}" for s in (12.5, 3.0, 1.0)])
    axes = plot_axes(figure)
    assert len(axes) == n * 3
    assert all(not ax.axison for ax in axes)
    assert [axes[3 * row].get_title() for row in range(n)] == ["score 12.5", "score 3.0", "score 1.0"]
    heat_maps = [ax.get_images()[0] for ax in axes[2::3]]
    assert all(isinstance(im, AxesImage) and im.get_cmap().name == "inferno" for im in heat_maps)
    assert len({im.get_clim() for im in heat_maps}) == 1
    assert heat_maps[0].get_clim() == (0.0, pytest.approx(maps.max()))
    np.testing.assert_allclose(heat_maps[1].get_array(), maps[1])


def test_image_grid_rejects_mismatched_rows():
    with pytest.raises(ValueError):
        plots.image_grid(np.zeros((2, 1, 4, 4)), np.zeros((2, 1, 4, 4)), np.zeros((2, 4, 4)), ["one"])


def test_png_bytes_signature_and_no_shared_state():
    first = plots.loss_curves(HISTORY)
    before = plots.png_bytes(first, dpi=50)
    assert before.startswith(PNG_SIGNATURE)
    other = plots.roc_pr_curves(np.array([0, 1, 0, 1]), np.array([0.1, 0.9, 0.2, 0.8]))
    assert plots.png_bytes(other, dpi=50).startswith(PNG_SIGNATURE)
    assert plots.png_bytes(first, dpi=50) == before
    # Higher dpi, larger image: the argument is honoured.
    assert len(plots.png_bytes(first, dpi=100)) > len(before)


def test_names_with_dollar_signs_render_as_written():
    """Column and file names are data: a pair of "$" in one (currency columns, templated file
    names) used to be parsed as mathtext and failed the whole report with a ParseSyntaxException."""
    names = ["cost_$_per_$_unit", r"$\alpha", "<b>&"]
    figure = plots.feature_contributions(np.array([[0.5, 0.3, 0.2]]), names)
    assert plots.png_bytes(figure, dpi=50).startswith(PNG_SIGNATURE)
    assert [t.get_text() for t in plot_axes(figure)[0].get_yticklabels()] == names
    grid = plots.image_grid(np.zeros((1, 1, 4, 4)), np.zeros((1, 1, 4, 4)), np.zeros((1, 4, 4)),
                            ["scan_$_a_$_b.png: score 3"])
    assert plots.png_bytes(grid, dpi=50).startswith(PNG_SIGNATURE)
    assert plot_axes(grid)[0].get_title() == "scan_$_a_$_b.png: score 3"
