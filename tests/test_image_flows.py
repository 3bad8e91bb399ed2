"""The Prefect flows with an image bundle, run for real against a temporary local server."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from flows.score import score_flow
from flows.train import train_flow
from pipeline.config import CalibrationConfig, ImageTrainJob, PipelineConfig, ScoreJob, TrainingConfig
from pipeline.errors import ConfigError, DataError
from pipeline.image_score import errors_path
from pipeline.outputs import summary_path
from pipeline.scoring import score

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_harness")]

N_IMAGES = 100
SIZE = 16


def blobs(n: int, seed: int) -> np.ndarray:
    """Soft bright blobs at random places on a dark background, uint8 [n, SIZE, SIZE]."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    centres = rng.uniform(4, SIZE - 4, size=(n, 2, 1, 1))
    images = np.exp(-((yy - centres[:, 0]) ** 2 + (xx - centres[:, 1]) ** 2) / 8.0)
    return np.rint(np.clip(images + rng.normal(0, 0.02, images.shape), 0, 1) * 255).astype(np.uint8)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("flow-images") / "normal"
    folder.mkdir()
    for i, pixels in enumerate(blobs(N_IMAGES, seed=0)):
        Image.fromarray(pixels, mode="L").save(folder / f"img_{i:03d}.png")
    return folder


def flagged_folder(image_folder: Path, folder: Path, n: int = 10) -> Path:
    """``folder`` with ``n`` of the normal images and 3 of noise, which the bundle flags: an input with maps."""
    folder.mkdir(parents=True)
    for image in sorted(image_folder.glob("*.png"))[:n]:
        (folder / image.name).write_bytes(image.read_bytes())
    rng = np.random.default_rng(len(folder.name))
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (SIZE, SIZE), dtype=np.uint8), mode="L").save(folder / f"noise_{i}.png")
    return folder


def unreadable_folder(folder: Path) -> Path:
    """An input whose scoring fails (no image can be read), after the inputs before it are scored."""
    folder.mkdir(parents=True)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return folder


def files_under(folder: Path) -> dict[str, bytes | None]:
    """What ``folder`` holds, hidden files and folders too (None for a folder), by relative path."""
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None for p in sorted(folder.rglob("*"))}


@pytest.fixture(scope="module")
def flow_facts(tmp_path_factory, image_folder) -> dict:
    training = TrainingConfig(max_epochs=3, patience=3, batch_size=32, threads=2, progress=False)
    config = PipelineConfig(training=training, calibration=CalibrationConfig(target_fpr=0.05))
    job = ImageTrainJob(data=image_folder, name="flowed-images", out_dir=tmp_path_factory.mktemp("flow-exported"),
                        image_size=SIZE, channels=1, config=config)
    return train_flow(job)


def test_train_flow_publishes_a_verified_image_bundle(flow_facts):
    bundle = Path(flow_facts["bundle"])
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["modality"] == "image"
    assert manifest["verification"]["passed"] is True
    assert manifest["image"]["size"] == SIZE and manifest["image"]["channels"] == 1
    assert manifest["source"]["images"] == N_IMAGES
    assert flow_facts["load_images"] == {"images": N_IMAGES, "skipped": 0}
    assert sum(flow_facts["split"].values()) == N_IMAGES
    assert flow_facts["train_model"]["epochs"] == 3
    assert sorted(p.name for p in bundle.iterdir()) == ["calibration_images.npy", "decoder.onnx", "encoder.onnx",
                                                        "manifest.json", "report.html", "report_files", "scorer.onnx"]
    assert not [p for p in bundle.parent.iterdir() if p.name.startswith(".")]  # run folder removed


def test_score_flow_writes_one_row_per_image(flow_facts, image_folder, tmp_path):
    output = tmp_path / "out" / "scores.parquet"
    summary = score_flow(ScoreJob(bundle=Path(flow_facts["bundle"]), inputs=(image_folder,), output=output,
                                  device="cpu"))
    scored = pd.read_parquet(output)
    assert len(scored) == summary["rows"] == N_IMAGES
    assert sorted(scored["path"]) == sorted(str(p) for p in image_folder.glob("*.png"))
    assert np.isfinite(scored["score"]).all()
    assert json.loads(summary_path(output).read_text())["rows"] == N_IMAGES
    assert sorted(p.name for p in output.parent.iterdir()) == ["scores.parquet", "scores.summary.json"]


def test_score_flow_reports_unreadable_images(flow_facts, image_folder, tmp_path):
    folder = tmp_path / "incoming"
    folder.mkdir()
    for source in sorted(image_folder.glob("*.png"))[:5]:
        (folder / source.name).write_bytes(source.read_bytes())
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    output = tmp_path / "scores.parquet"
    summary = score_flow(ScoreJob(bundle=Path(flow_facts["bundle"]), inputs=(folder,), output=output, device="cpu"))
    assert summary["rows"] == len(pd.read_parquet(output)) == 5
    assert summary["files"][0]["skipped"] == 1
    errors = pd.read_csv(errors_path(output))
    assert errors["path"].tolist() == [str(folder / "broken.png")]


def test_score_flow_and_the_local_scorer_write_the_same_table_for_several_inputs(flow_facts, image_folder, tmp_path):
    """Several inputs: both name each row's input in a `source` column first (the local scorer wrote none)."""
    second = tmp_path / "second"
    second.mkdir()
    for source in sorted(image_folder.glob("*.png"))[:3]:
        (second / source.name).write_bytes(source.read_bytes())
    job = ScoreJob(bundle=Path(flow_facts["bundle"]), inputs=(image_folder, second), output=tmp_path / "flow.parquet",
                   device="cpu")
    score_flow(job)
    local = dataclasses.replace(job, output=tmp_path / "local.parquet")
    score(local)
    flowed, scored = pd.read_parquet(job.output), pd.read_parquet(local.output)
    assert list(scored.columns) == ["source", "path", "score", "recon", "kl", "p_value", "is_anomaly"]
    assert scored["source"].tolist() == [str(image_folder)] * N_IMAGES + [str(second)] * 3
    pd.testing.assert_frame_equal(flowed, scored)


def test_score_flow_refuses_report_figures_inside_an_input_folder(flow_facts, image_folder, tmp_path):
    """As `vaeguard score` does: the figures of OUT.report.html would be scored as images by the
    next run of that folder. The flow's tasks never see --report, so the flow itself must check."""
    folder = tmp_path / "incoming"
    folder.mkdir()
    for image in sorted(image_folder.glob("*.png"))[:3]:
        (folder / image.name).write_bytes(image.read_bytes())
    before = sorted(folder.rglob("*"))
    job = ScoreJob(bundle=Path(flow_facts["bundle"]), inputs=(folder,), output=folder / "s.csv", device="cpu",
                   report=True)
    with pytest.raises(ConfigError, match=r"^--report: its PNGs would go to .*inside the input folder"):
        score_flow(job)
    assert sorted(folder.rglob("*")) == before


def test_score_flow_refuses_a_folder_holding_the_bundle_before_any_folder_is_scored(flow_facts, image_folder, tmp_path,
                                                                                      monkeypatch):
    """The plain run refuses it before any work; the flow's own task for that folder refused it only
    once its turn came, after the folders before it were scored."""
    import flows.score

    first, second = tmp_path / "monday", tmp_path / "tuesday"
    for folder in (first, second):
        folder.mkdir()
        for image in sorted(image_folder.glob("*.png"))[:3]:
            (folder / image.name).write_bytes(image.read_bytes())
    bundle = Path(shutil.copytree(flow_facts["bundle"], second / "exported" / "images"))
    scored = []
    monkeypatch.setattr(flows.score, "score", lambda job: scored.append(job.inputs) or score(job))
    job = ScoreJob(bundle=bundle, inputs=(first, second), output=tmp_path / "out" / "s.csv", device="cpu")
    with pytest.raises(ConfigError, match=rf"^{second}: holds the bundle {bundle}, whose report figures"):
        score_flow(job)
    assert scored == [] and not (tmp_path / "out").exists()


def test_score_flow_failing_on_a_later_input_makes_no_maps(flow_facts, image_folder, tmp_path):
    """Each task moved its input's maps in as it ended: a run that failed on its second input left the
    first input's maps, in a maps folder it had made."""
    first = flagged_folder(image_folder, tmp_path / "monday")
    maps = tmp_path / "new" / "maps"
    job = ScoreJob(bundle=Path(flow_facts["bundle"]), inputs=(first, unreadable_folder(tmp_path / "tuesday")),
                   output=tmp_path / "scores.parquet", device="cpu", maps_dir=maps)
    with pytest.raises(DataError, match="none of the 1 image file"):
        score_flow(job)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["monday", "tuesday"]  # no maps folder, no parts
    score_flow(dataclasses.replace(job, inputs=(first,)))  # the first input alone does get maps
    assert list(maps.glob("*.png")) and not [p for p in maps.iterdir() if p.name.startswith(".")]
