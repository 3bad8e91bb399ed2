"""Training and scoring reports: their plots carry the bundle's numbers, and the HTML renders
in a real headless Chromium with every image loaded."""

from __future__ import annotations

import html
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline import workflow
from pipeline.bundle import Bundle
from pipeline.cli import main
from pipeline.config import ScoreJob, TrainJob
from pipeline.outputs import SCORING_REPORT_FIGURES
from pipeline.preprocess import CategoricalStats, NumericStats, Preprocessor
from pipeline.scoring_report import column_shares, scoring_sections
from pipeline.training_report import table_sections
from tests.conftest import disk_full_when_writing, quiet_config

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
    assert np.all(np.diff(top["vaeguard", "score"].to_numpy()) <= 0)  # highest scores first
    # The bundle's own scores (onnxruntime), as its threshold and metrics are, not PyTorch's.
    from pipeline.bundle import Bundle
    from pipeline.runtime import BundleScorer

    held_out = pd.read_parquet(run.rows).iloc[workflow.load_splits(run).test]
    own = BundleScorer(Bundle.load(run.bundle), device="cpu").score_frame(held_out, "held-out rows")["score"]
    np.testing.assert_array_equal(top["vaeguard", "score"].to_numpy(), np.sort(own.to_numpy())[::-1][:len(top)])
    assert set(top["vaeguard", "main driver"]) <= set(manifest["schema"]["numeric"]) | set(manifest["schema"]["categorical"])


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
    assert top["data", "row_id"].astype(int).tolist() == scored.nlargest(10, "score")["row_id"].astype(int).tolist()
    assert (tmp_path / "scores.report.html").exists()
    # A second run into the same folder keeps the first run's report.
    first = (tmp_path / "scores.report.html").read_bytes()
    assert main(["score", str(trained_bundle), str(incoming_csv), "--output", str(tmp_path / "feb.csv"),
                 "--device", "cpu", "--report"]) == 0
    assert (tmp_path / "scores.report.html").read_bytes() == first
    assert sorted(p.name for p in tmp_path.glob("*.report*")) == ["feb.report.html", "feb.report_files",
                                                                  "scores.report.html", "scores.report_files"]
    # The only PNGs a later run's commit removes from there (pipeline.outputs.stage_report_removal).
    assert {p.name for p in (tmp_path / "scores.report_files").iterdir()} <= SCORING_REPORT_FIGURES


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
    top = scoring_sections(ScoreJob(trained_bundle, (data,), out))[3].tables[0][1]
    first_two = top["vaeguard"].set_axis(top["data", "row_id"]).head(2)
    assert np.isinf(first_two["score"].astype(float)).all()
    assert first_two["main driver"].to_dict() == {rows.loc[10, "row_id"]: "vibration", rows.loc[20, "row_id"]: "pressure"}


def test_scoring_report_says_which_column_holds_values_the_bundle_never_saw(trained_bundle, incoming_csv, tmp_path):
    """The drift figures show that a night's scores rose; the report says why when a column came
    spelled differently ('a' for 'A'), as the run's warning does."""
    import pandas as pd

    rows = pd.read_csv(incoming_csv, dtype={"row_id": str}).head(500)
    rows["line"] = rows["line"].str.lower()
    data = tmp_path / "lower.csv"
    rows.to_csv(data, index=False)
    out = tmp_path / "scores.parquet"
    assert main(["score", str(trained_bundle), str(data), "--output", str(out), "--device", "cpu", "--report"]) == 0
    drift = scoring_sections(ScoreJob(trained_bundle, (data,), out))[2]
    alerts = drift.alert.split("\n")
    assert sum("never saw" in a for a in alerts) == 1
    assert any(a.startswith(f"{data}: column 'line': 500 of 500 rows (100%) hold values the bundle never saw")
               for a in alerts)
    html = (tmp_path / "scores.report.html").read_text()
    assert "column &#x27;line&#x27;: 500 of 500 rows" in html
    # The same data as training spells it: no such alert.
    plain = tmp_path / "plain.parquet"
    assert main(["score", str(trained_bundle), str(incoming_csv), "--output", str(plain), "--device", "cpu"]) == 0
    assert "never saw" not in scoring_sections(ScoreJob(trained_bundle, (incoming_csv,), plain))[2].alert


@pytest.fixture(scope="module")
def named_like_the_report(tmp_path_factory):
    """A finished training run on columns named like the reports' own ('score', 'main driver') and like a
    one-hot ('a=b', a number, beside the categorical 'a' holding 'b'), and a batch whose row 7 is far out in
    'a=b'."""
    import pandas as pd

    rng = np.random.default_rng(5)

    def frame(n: int) -> pd.DataFrame:
        return pd.DataFrame({"row": np.arange(n), "score": rng.normal(size=n), "main driver": rng.choice(["p", "q"], n),
                             "a=b": rng.normal(size=n), "a": rng.choice(["b", "c"], n), "x": rng.normal(size=n)})

    folder = tmp_path_factory.mktemp("named-like-the-report")
    frame(400).to_csv(folder / "train.csv", index=False)
    batch = frame(50)
    batch.loc[7, "a=b"] = 40.0
    batch.to_csv(folder / "batch.csv", index=False)
    job = TrainJob(data=folder / "train.csv", name="clash", out_dir=folder / "exported", id_columns=("row",),
                   config=quiet_config(max_epochs=10))
    run = workflow.RunDir.create(job)
    for step in workflow.STEPS[:-1]:
        step(job, run)
    return job, run, folder / "batch.csv"


def test_reports_keep_data_columns_named_like_their_own_apart(named_like_the_report, tmp_path):
    """A feature named 'score' or 'main driver' is data: the training report failed after the whole run
    ("cannot insert score, already exists"); and a column 'a=b' was reported as the one-hot of 'a'."""
    import pandas as pd

    job, run, batch = named_like_the_report
    top = table_sections(job, run)[-2].tables[0][1]
    rows = pd.read_parquet(run.rows)
    assert list(top["vaeguard"].columns) == ["score", "main driver"]
    assert list(top["data"].columns) == list(rows.columns) and {"score", "main driver"} <= set(rows.columns)
    rows = rows.set_index("row")
    assert np.all(np.diff(top["vaeguard", "score"].to_numpy()) <= 0)
    assert top["data", "score"].tolist() == rows.loc[top["data", "row"], "score"].tolist()
    assert set(top["vaeguard", "main driver"]) <= {"score", "main driver", "a=b", "a", "x"}

    workflow.STEPS[-1](job, run)  # the training report, written whole
    bundle, out = workflow.publish(job, run), tmp_path / "scores.parquet"
    assert main(["score", str(bundle), str(batch), "--output", str(out), "--device", "cpu", "--report"]) == 0
    assert list(pd.read_parquet(out).columns) == ["row", "score", "recon", "kl", "p_value", "is_anomaly"]
    top = scoring_sections(ScoreJob(bundle, (batch,), out))[3].tables[0][1]
    assert top["data", "row"].iloc[0] == "7" and top["data", "a=b"].iloc[0] == 40.0
    assert top["vaeguard", "main driver"].iloc[0] == "a=b"
    assert top["data", "score"].iloc[0] == pd.read_csv(batch)["score"].iloc[7]


def test_column_shares_sum_each_columns_features_by_position_not_by_name():
    """'a=b' (a number) and category 'b' of 'a' give features of one name; 'x__missing' reads like the
    missing flag of 'x'. Each feature's error goes to the column it came from."""
    pre = Preprocessor(numeric=(NumericStats("a=b", 0.0, 1.0, False), NumericStats("x__missing", 0.0, 1.0, True),
                                NumericStats("x", 0.0, 1.0, False)),
                       categorical=(CategoricalStats("a", ("b",)),))
    assert pre.feature_names == ["a=b", "x__missing", "x", "x__missing__missing", "a=b", "a=__unknown__"]
    errors = np.array([[1.0, 2.0, 4.0, 8.0, 16.0, 32.0]])
    shares = column_shares(errors, pre)
    assert list(shares.columns) == ["a=b", "x__missing", "x", "a"]
    assert shares.iloc[0].tolist() == [1 / 63, 10 / 63, 4 / 63, 48 / 63]


@needs_browser
def test_scoring_report_renders_with_every_image(trained_bundle, incoming_csv, tmp_path):
    out = tmp_path / "scores.csv"
    assert main(["score", str(trained_bundle), str(incoming_csv), "--output", str(out), "--device", "cpu",
                 "--report"]) == 0
    assert_renders(tmp_path / "scores.report.html", tmp_path, expected_images=2)


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
    assert_renders(out.parent / "scores.report.html", tmp_path, expected_images=2)


def small_figure(title: str = "ok"):
    from matplotlib.figure import Figure

    figure = Figure(figsize=(2, 2))
    figure.subplots().set_title(title)
    return figure


HOSTILE = '<script>alert(1)</script> & "q" \'s t\u00b0 \U0001F600'


def test_report_escapes_user_text_everywhere(tmp_path):
    import html as html_lib

    import pandas as pd

    from pipeline.report_html import Section, write_report

    frame = pd.DataFrame({HOSTILE: [HOSTILE], "score": [1.5]})
    section = Section(HOSTILE, text=HOSTILE, alert=HOSTILE, figures=[(HOSTILE, small_figure())],
                      tables=[(HOSTILE, frame)])
    path = write_report(tmp_path / "report.html", HOSTILE, [section])
    text = path.read_text(encoding="utf-8")
    assert "<script>" not in text and 'alt="<' not in text
    # <title>, <h1>, <h2>, alert, text, alt, caption, header and cell: each shown as written.
    assert html_lib.unescape(text).count(HOSTILE) == 9


def test_report_writes_in_any_locale_and_with_undecodable_names(tmp_path):
    """Python writes text in the locale's encoding: under an ASCII locale a "\u00b0" in a column
    name raised UnicodeEncodeError, and a file name that is not UTF-8 (lone surrogates) failed in
    any locale. The report is now ASCII with character references, the same bytes everywhere."""
    import html as html_lib
    import os
    import subprocess
    import sys

    from pipeline.report_html import Section, write_report

    code = ("import sys; from pathlib import Path; from pipeline.report_html import Section, write_report; "
            "write_report(Path(sys.argv[1]), 't\\u00b0 \\U0001F600', [Section('caf\\u00e9')])")
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "a" / "report.html")], env=env,
                          capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr
    text = html_lib.unescape((tmp_path / "a" / "report.html").read_bytes().decode("ascii"))
    assert "<h1>t\u00b0 \U0001F600</h1>" in text and "<h2>caf\u00e9</h2>" in text

    name = os.fsdecode(b"caf\xe9.png")  # as os.listdir gives a Latin-1 file name
    write_report(tmp_path / "b" / "report.html", f"scores of {name}", [Section(name)])
    text = html_lib.unescape((tmp_path / "b" / "report.html").read_text(encoding="ascii"))
    assert "<h2>caf\\xe9.png</h2>" in text  # the escape the scores file uses for the same name


def test_failed_report_leaves_nothing_and_a_new_one_leaves_no_stale_figure(tmp_path):
    from pipeline.report_html import Section, write_report

    out = tmp_path / "scored"
    broken = Section("x", figures=[("first", small_figure()), ("second", small_figure(r"$\notacommand$"))])
    with pytest.raises(ValueError):
        write_report(out / "report.html", "t", [broken])
    assert not out.exists() or list(out.iterdir()) == []  # no half-filled report_files/

    write_report(out / "report.html", "t", [Section("x", figures=[("first", small_figure()),
                                                                   ("second", small_figure())])])
    write_report(out / "report.html", "t", [Section("x", figures=[("first", small_figure())])])
    assert sorted(p.name for p in out.iterdir()) == ["report.html", "report_files"]
    assert [p.name for p in (out / "report_files").iterdir()] == ["first.png"]


def test_a_signal_while_a_report_replaces_the_last_one_leaves_page_and_figures_of_one_report(tmp_path, monkeypatch):
    """The page was renamed into place first, then the figures folder: Ctrl-C between the two left
    the new page beside no figures folder (the earlier one moved aside and deleted)."""
    import pathlib
    import signal

    from pipeline.report_html import Section, write_report
    from pipeline.signals import StoppedAfterCommit

    out = tmp_path / "report.html"
    write_report(out, "first", [Section("x", figures=[("old", small_figure())])])
    rename = pathlib.Path.rename

    def interrupted_rename(self, target):
        moved = rename(self, target)
        if self.name == "report_files":  # the earlier report's figures, moved aside
            signal.raise_signal(signal.SIGINT)
        return moved

    monkeypatch.setattr(pathlib.Path, "rename", interrupted_rename)
    with pytest.raises(StoppedAfterCommit):
        write_report(out, "second", [Section("x", figures=[("new", small_figure())])])
    assert "second" in out.read_text(encoding="ascii")
    assert [p.name for p in (tmp_path / "report_files").iterdir()] == ["new.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html", "report_files"]


def test_report_where_a_folder_or_file_is_in_the_way_says_so(tmp_path):
    from pipeline.errors import ConfigError
    from pipeline.report_html import Section, write_report

    (tmp_path / "report.html").mkdir()
    with pytest.raises(ConfigError, match=r"report .*report.html: is an existing directory"):
        write_report(tmp_path / "report.html", "t", [Section("x", figures=[("first", small_figure())])])
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]
    (tmp_path / "other_files").write_text("mine")
    with pytest.raises(ConfigError, match=r"report figures .*other_files: is an existing file"):
        write_report(tmp_path / "other.html", "t", [Section("x")])
    assert (tmp_path / "other_files").read_text() == "mine"


def stripes(rng, size: int = 16) -> np.ndarray:
    x = np.arange(size)
    picture = 0.5 + 0.4 * np.sin(2 * np.pi * (x[None, :] + rng.uniform(0, 6)) / 6) + rng.normal(0, 0.03, (size, size))
    return (np.clip(picture, 0, 1) * 255).astype(np.uint8)


@pytest.fixture(scope="module")
def image_bundle(tmp_path_factory) -> Path:
    import dataclasses

    from PIL import Image

    from pipeline.config import CalibrationConfig, ImageTrainJob
    from pipeline.image_workflow import run_image_training

    rng = np.random.default_rng(0)
    folder = tmp_path_factory.mktemp("stripes")
    for i in range(100):
        Image.fromarray(stripes(rng)).save(folder / f"{i:03d}.png")
    config = dataclasses.replace(quiet_config(max_epochs=5), calibration=CalibrationConfig(target_fpr=0.05))
    return Path(run_image_training(ImageTrainJob(data=folder, name="stripes", out_dir=tmp_path_factory.mktemp("exp"), image_size=16,
                                                 config=config))["bundle"])


def shown_images(sections) -> tuple[list[str], list[np.ndarray]]:
    axes = [ax for ax in figure(sections, "top images").axes if ax.get_label() != "<colorbar>"]
    return [ax.get_title() for ax in axes[::3]], [ax.get_images()[0].get_array() for ax in axes[::3]]


def test_scoring_report_shows_each_top_image_of_an_array(image_bundle, tmp_path):
    """An array's item was loaded as a one-item source, which always gave the array's first
    image: every row of the grid showed image 0 with image 0's score."""
    import pandas as pd

    rng = np.random.default_rng(1)
    array = np.stack([stripes(rng) for _ in range(12)])
    array[7] = 0  # a black image, to score high
    np.save(tmp_path / "batch.npy", array)
    out = tmp_path / "scores.csv"
    assert main(["score", str(image_bundle), str(tmp_path / "batch.npy"), "--output", str(out), "--device", "cpu",
                 "--report"]) == 0
    scored = pd.read_csv(out).sort_values("score", ascending=False, kind="stable").head(8)
    titles, pictures = shown_images(scoring_sections(ScoreJob(image_bundle, (tmp_path / "batch.npy",), out)))
    indices = [int(path.rsplit("[", 1)[1][:-1]) for path in scored["path"]]
    assert titles == [f"batch.npy[{i}]: score {s:.4g}" for i, s in zip(indices, scored["score"])]
    for index, picture in zip(indices, pictures):
        np.testing.assert_allclose(picture, array[index] / 255.0, atol=1e-6)
    assert {p.name for p in (tmp_path / "scores.report_files").iterdir()} <= SCORING_REPORT_FIGURES


def test_scoring_report_of_undecodable_and_dollar_file_names(image_bundle, tmp_path):
    """The scores file holds a non-UTF-8 name escaped ("caf\\xe9"): the report opened that text as
    a path, found nothing, and failed with "need at least one array to stack". A name with a
    pair of "$" failed as mathtext."""
    import os

    from PIL import Image

    rng = np.random.default_rng(2)
    folder = tmp_path / "latin1"
    folder.mkdir()
    for i in range(4):
        Image.fromarray(stripes(rng)).save(os.path.join(folder, os.fsdecode(b"caf\xe9_$_a_$_%d.png" % i)))
    out = tmp_path / "scored" / "scores.parquet"
    assert main(["score", str(image_bundle), str(folder), "--output", str(out), "--device", "cpu", "--report"]) == 0
    sections = scoring_sections(ScoreJob(image_bundle, (folder,), out))
    titles, _ = shown_images(sections)
    assert len(titles) == 4 and all(t.startswith("caf\\xe9_$_a_$_") for t in titles)
    html = (out.parent / "scores.report.html").read_text(encoding="ascii")
    assert html.count("<img ") == 2

    for picture in folder.iterdir():
        picture.unlink()  # scored, then moved away before the report was rebuilt
    (last,) = [s for s in scoring_sections(ScoreJob(image_bundle, (folder,), out)) if s.title == "Most anomalous images"]
    assert not last.figures and "None of the 4 highest-scoring images could be read again" in last.text


def test_scoring_report_says_when_a_batch_was_too_small_to_judge_drift(trained_bundle, incoming_csv, tmp_path):
    """A one-row batch can't reach either limit, whatever it holds; the report said nothing of it,
    and its lack of an alert read as a calm batch."""
    from pipeline.scoring_report import summary_markdown

    data = tmp_path / "hour.csv"
    pd.read_csv(incoming_csv).head(1).to_csv(data, index=False)
    out = tmp_path / "scores.parquet"
    assert main(["score", str(trained_bundle), str(data), "--output", str(out), "--device", "cpu", "--report"]) == 0
    job = ScoreJob(trained_bundle, (data,), out)
    notes = [paragraph for paragraph in scoring_sections(job)[2].text.split("\n\n") if "not judged" in paragraph]
    assert [n.split(":")[0] for n in notes] == ["anomaly rate not judged", "PSI not judged"]
    page, markdown = (tmp_path / "scores.report.html").read_text(), summary_markdown(job)
    assert all(html.escape(note, quote=False) in page and f"\n{note}" in markdown for note in notes)


def test_each_drift_alert_is_its_own_paragraph(tmp_path):
    """Alerts carry "; " inside them, so two joined by "; " read as one."""
    from pipeline.report_html import Section, write_report

    path = write_report(tmp_path / "r.html", "t", [Section("Drift", alert="rate 9% is far above 1%; inspect\n"
                                                                            "PSI 0.41 > 0.25; retrain")])
    assert path.read_text().count('<p class="alert">') == 2


def test_score_with_a_report_that_cannot_be_written_fails_before_scoring(capsys, trained_bundle, incoming_csv,
                                                                         tmp_path):
    (tmp_path / "scores.report_files").write_text("mine")  # a file where the figures folder would go
    out = tmp_path / "scores.parquet"
    assert main(["score", str(trained_bundle), str(incoming_csv), "--output", str(out), "--device", "cpu",
                 "--report"]) == 1
    assert "report figures" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scores.report_files"]


def earlier_report(tmp_path: Path, trained_bundle: Path, incoming_csv: Path) -> tuple[Path, bytes]:
    """An earlier run's scores with their report; the report page's bytes."""
    out = tmp_path / "scores.parquet"
    assert main(["score", str(trained_bundle), str(incoming_csv), "--output", str(out), "--device", "cpu",
                 "--report"]) == 0
    assert sorted(p.name for p in (tmp_path / "scores.report_files").iterdir()) == ["feature_contributions.png",
                                                                                   "scores_against_calibration.png"]
    return out, (tmp_path / "scores.report.html").read_bytes()


@pytest.mark.parametrize("how", ["Ctrl-C", "error"])
def test_a_report_that_stops_or_fails_after_the_scores_leaves_no_earlier_report(capsys, monkeypatch, tmp_path,
                                                                                trained_bundle, incoming_csv, how):
    """The report is written after the scores' commit: stopped or failed then, it left the earlier
    run's report, which names the same scores file, beside the new scores it does not describe."""
    import os
    import signal

    import pipeline.scoring_report as scoring_report

    out, _ = earlier_report(tmp_path, trained_bundle, incoming_csv)
    summary = (tmp_path / "scores.summary.json").read_text()

    def stopped(job):
        if how == "error":
            raise RuntimeError("the report failed")
        os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(scoring_report, "scoring_sections", stopped)
    code = main(["score", str(trained_bundle), str(incoming_csv), "--output", str(out), "--device", "cpu", "--report"])
    err = capsys.readouterr().err
    assert code == (130 if how == "Ctrl-C" else 1)
    assert "after the output was written whole" in err if how == "Ctrl-C" else "the report failed" in err
    assert (tmp_path / "scores.summary.json").read_text() != summary  # the new scores were committed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scores.parquet", "scores.summary.json"]


def test_scores_without_a_report_remove_the_earlier_report_and_only_its_figures(capsys, tmp_path, trained_bundle,
                                                                                 incoming_csv):
    """Without --report, an earlier OUT.report.html stayed beside the new OUT: a report that names the
    scores file and describes other data. A file of the user's in its figures folder stays."""
    out, _ = earlier_report(tmp_path, trained_bundle, incoming_csv)
    assert main(["score", str(trained_bundle), str(incoming_csv), "--output", str(out), "--device", "cpu"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scores.parquet", "scores.summary.json"]

    earlier_report(tmp_path, trained_bundle, incoming_csv)
    (tmp_path / "scores.report_files" / "notes.txt").write_text("mine")
    (tmp_path / "scores.report_files" / "slide.png").write_bytes(b"mine too")
    assert main(["score", str(trained_bundle), str(incoming_csv), "--output", str(out), "--device", "cpu"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scores.parquet", "scores.report_files", "scores.summary.json"]
    assert sorted(p.name for p in (tmp_path / "scores.report_files").iterdir()) == ["notes.txt", "slide.png"]


def test_a_run_that_fails_before_its_commit_keeps_the_earlier_report(monkeypatch, tmp_path, trained_bundle,
                                                                      incoming_csv):
    """The earlier report goes with the commit of the new scores, not before it."""
    from pipeline.scoring import score

    out, page = earlier_report(tmp_path, trained_bundle, incoming_csv)
    before = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    disk_full_when_writing(monkeypatch, "scores.summary.json")
    with pytest.raises(OSError, match="No space left"):
        score(ScoreJob(trained_bundle, (incoming_csv,), out, device="cpu"))
    assert {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scores.parquet", "scores.report.html", "scores.report_files",
                                                          "scores.summary.json"]  # and no temporary file
