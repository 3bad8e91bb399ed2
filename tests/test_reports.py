"""Training and scoring reports: their plots carry the bundle's numbers, and the HTML renders
in a real headless Chromium with every image loaded."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from pipeline import workflow
from pipeline.bundle import Bundle
from pipeline.cli import main
from pipeline.config import ScoreJob, TrainJob
from pipeline.scoring_report import scoring_sections
from pipeline.training_report import table_sections
from tests.conftest import quiet_config

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_browser = pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (make test installs it)")


def figure(sections, title: str):
    return next(fig for section in sections for name, fig in section.figures if name == title)


def open_in_browser(html: Path, screenshot: Path) -> list[list]:
    """Load the page in headless Chromium; return [complete, naturalWidth, naturalHeight] per <img>."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        try:
            page = browser.new_page()
            page.goto(html.resolve().as_uri())
            page.wait_for_load_state("load")
            images = page.evaluate("Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.naturalHeight])")
            page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    return images


def assert_renders(html: Path, tmp_path: Path, expected_images: int) -> None:
    images = open_in_browser(html, tmp_path / "screenshot.png")
    assert len(images) == expected_images
    assert all(complete and width > 0 and height > 0 for complete, width, height in images), images
    shot = (tmp_path / "screenshot.png").read_bytes()
    assert shot.startswith(b"\x89PNG") and len(shot) > 10_000


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, sensor_csv):
    """A training run's folder after every step but publishing, so the report's figures can be built."""
    out = tmp_path_factory.mktemp("report-run")
    job = TrainJob(data=sensor_csv, name="sensors", out_dir=out, label_column="label", id_columns=("row_id",),
                   config=quiet_config(max_epochs=30))
    run = workflow.RunDir.create(job)
    for step in workflow.STEPS[:-1]:
        step(job, run)
    return job, run


def test_training_report_plots_carry_the_bundle_numbers(finished_run):
    job, run = finished_run
    manifest = workflow.read_json(run.bundle / "manifest.json")
    sections = table_sections(job, run)
    titles = [s.title for s in sections]
    assert titles == ["Training", "Calibration", "Detection on held-out rows", "Latent space", "Top anomalies",
                      "Run facts"]
    threshold_lines = [line for ax in figure(sections, "calibration scores").axes for line in ax.lines
                       if "threshold" in str(line.get_label())]
    assert len(threshold_lines) == 1
    assert list(threshold_lines[0].get_xdata()) == [manifest["calibration"]["threshold"]] * 2
    roc_title = figure(sections, "roc and precision-recall").axes[0].get_title()
    assert f"{manifest['metrics']['auroc']:.4f}" in roc_title
    best = [line for ax in figure(sections, "loss curves").axes for line in ax.lines if "best" in str(line.get_label())]
    assert best and all(list(line.get_xdata()) == [manifest["training"]["best_epoch"]] * 2 for line in best)
    top = sections[4].tables[0][1]
    assert np.all(np.diff(top["score"].to_numpy()) <= 0)  # highest scores first
    assert set(top["main driver"]) <= set(manifest["schema"]["numeric"]) | set(manifest["schema"]["categorical"])


@needs_browser
def test_training_report_renders_with_every_image(trained_bundle, tmp_path):
    report = trained_bundle / "report.html"
    pngs = sorted(p.name for p in (trained_bundle / "report_files").glob("*.png"))
    assert pngs == ["calibration_scores.png", "feature_contributions.png", "latent_space.png", "loss_curves.png",
                    "roc_and_precision_recall.png"]
    assert Bundle.load(trained_bundle)  # report files beside the models don't break the hash check
    assert_renders(report, tmp_path, expected_images=len(pngs))


def test_scoring_report_sections_match_the_scores(trained_bundle, incoming_csv, tmp_path):
    out = tmp_path / "scores.parquet"
    assert main(["score", str(trained_bundle), str(incoming_csv), "--output", str(out), "--device", "cpu",
                 "--report"]) == 0
    job = ScoreJob(trained_bundle, (incoming_csv,), out)
    sections = scoring_sections(job)
    assert [s.title for s in sections] == ["Scores against calibration", "Anomaly rate", "Drift", "Top anomalies"]
    threshold = Bundle.load(trained_bundle).calibration.threshold
    lines = [line for ax in figure(sections, "scores against calibration").axes for line in ax.lines]
    assert any(list(line.get_xdata()) == [threshold] * 2 for line in lines)
    import pandas as pd

    scored = pd.read_parquet(out)
    rate = sections[1].tables[0][1].set_index("fact")["value"]
    assert rate["anomalies"] == f"{int(scored['is_anomaly'].sum()):,}"
    top = sections[3].tables[0][1]
    assert top["row_id"].astype(int).tolist() == scored.nlargest(10, "score")["row_id"].astype(int).tolist()
    assert (tmp_path / "report.html").exists()


def test_scoring_report_names_the_column_that_overflowed(trained_bundle, incoming_csv, tmp_path):
    """A value that overflows float32 scores +inf; the report must still build, and name the
    column that did it as the row's main driver, not fail on the NaN errors it leaves."""
    import pandas as pd

    rows = pd.read_csv(incoming_csv, dtype={"row_id": str}).head(500)
    rows.loc[10, "vibration"] = 3.3e38  # overflows when scaled
    rows.loc[20, "pressure"] = 1e30  # its error overflows float32
    data = tmp_path / "extreme.csv"
    rows.to_csv(data, index=False)
    out = tmp_path / "scores.parquet"
    assert main(["score", str(trained_bundle), str(data), "--output", str(out), "--device", "cpu", "--report"]) == 0
    top = scoring_sections(ScoreJob(trained_bundle, (data,), out))[3].tables[0][1].set_index("row_id")
    first_two = top.head(2)
    assert np.isinf(first_two["score"].astype(float)).all()
    assert first_two["main driver"].to_dict() == {rows.loc[10, "row_id"]: "vibration", rows.loc[20, "row_id"]: "pressure"}


@needs_browser
def test_scoring_report_renders_with_every_image(trained_bundle, incoming_csv, tmp_path):
    out = tmp_path / "scores.csv"
    assert main(["score", str(trained_bundle), str(incoming_csv), "--output", str(out), "--device", "cpu",
                 "--report"]) == 0
    assert_renders(tmp_path / "report.html", tmp_path, expected_images=2)


@needs_browser
def test_image_training_and_scoring_reports_render(tmp_path):
    from PIL import Image

    from pipeline.config import ImageTrainJob
    from pipeline.image_workflow import run_image_training

    rng = np.random.default_rng(0)
    folder = tmp_path / "normal"
    folder.mkdir()
    x = np.arange(16)
    for i in range(150):
        stripes = 0.5 + 0.4 * np.sin(2 * np.pi * (x[None, :] + rng.uniform(0, 6)) / 6) + rng.normal(0, 0.03, (16, 16))
        Image.fromarray((np.clip(stripes, 0, 1) * 255).astype(np.uint8)).save(folder / f"{i:03d}.png")
    import dataclasses

    from pipeline.config import CalibrationConfig

    config = dataclasses.replace(quiet_config(max_epochs=15), calibration=CalibrationConfig(target_fpr=0.05))
    bundle = Path(run_image_training(ImageTrainJob(data=folder, name="stripes", out_dir=tmp_path / "exp",
                                                   image_size=16, config=config))["bundle"])
    html = (bundle / "report.html").read_text()
    assert "Most anomalous images" in html and "Run facts" in html
    assert_renders(bundle / "report.html", tmp_path, expected_images=4)
    out = tmp_path / "scored" / "scores.parquet"
    assert main(["score", str(bundle), str(folder), "--output", str(out), "--device", "cpu", "--report"]) == 0
    assert_renders(out.parent / "report.html", tmp_path, expected_images=2)
