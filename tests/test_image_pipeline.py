"""The image pipeline end to end: train a convolutional VAE on normal images, export, score.

- one-class detection on real handwritten digits (scikit-learn's 8x8 digits);
- a synthetic stripe texture with injected defects: scores and where the anomaly map peaks;
- scoring a folder with corrupt files: rows, errors file, summary and anomaly-map PNGs;
- empty folders fail with one line, other sizes and modes convert;
- ONNX parity of encoder, decoder and scorer against PyTorch rebuilt from the bundle;
- an RGB folder through `vaeguard train` / `score` / `inspect`.

Every bundle is trained once per module, small (8x8 to 24x24) and on 2 threads.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pandas as pd
import pytest
import torch
from PIL import Image

from pipeline.anomaly_maps import _GAP, map_name
from pipeline.bundle import CALIBRATION_IMAGES, Bundle
from pipeline.cli import main
from pipeline.config import (CalibrationConfig, ImageTrainJob, PipelineConfig, ScoreJob, TrainingConfig)
from pipeline.contract import IMAGE_INPUT, IMAGE_OUTPUT_NAMES
from pipeline.image_model import ConvVAE
from pipeline.image_score import errors_path
from pipeline.image_workflow import run_image_training
from pipeline.metrics import auroc
from pipeline.outputs import summary_path
from pipeline.scorer_graph import ImageScorerGraph
from pipeline.scoring import score
from tests.conftest import disk_full_when_writing, run_main

SCORE_COLUMNS = ["path", "score", "recon", "kl", "p_value", "is_anomaly"]
TEXTURE = 24  # side of the synthetic textures
PERIOD = 6.0  # stripe period in pixels
MAP_SCALE = 4  # anomaly-map PNG panels are enlarged this many times (pipeline.anomaly_maps.composite)


def image_config(**training) -> PipelineConfig:
    """2 threads, no progress bar, target FPR 0.05 (a few dozen calibration images suffice)."""
    base = TrainingConfig(threads=2, progress=False, batch_size=32, learning_rate=3e-3)
    return PipelineConfig(training=dataclasses.replace(base, **training),
                          calibration=CalibrationConfig(target_fpr=0.05))


def save_png(path: Path, pixels: np.ndarray) -> Path:
    """[H, W] or [H, W, 3] floats in [0, 1] -> 8-bit PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.rint(np.clip(pixels, 0.0, 1.0) * 255).astype(np.uint8)
    Image.fromarray(array, mode="L" if array.ndim == 2 else "RGB").save(path)
    return path


def session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def as_loaded(images: np.ndarray) -> np.ndarray:
    """[N, H, W] floats -> [N, 1, H, W] float32 quantized to 8 bits, as pipeline.images loads them."""
    return (np.rint(np.clip(images, 0.0, 1.0) * 255) / 255).astype(np.float32)[:, None]


# --- synthetic stripe textures with defects -------------------------------------------------


def textures(n: int, seed: int, size: int = TEXTURE) -> np.ndarray:
    """Diagonal sinusoidal stripes with a random phase and a little pixel noise, [n, size, size]."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi, size=(n, 1, 1))
    stripes = 0.4 + 0.2 * np.sin(2 * np.pi * (xx + 0.5 * yy) / PERIOD + phase)
    return np.clip(stripes + rng.normal(0, 0.02, size=(n, size, size)), 0, 1).astype(np.float32)


def with_defects(n: int, seed: int, size: int = TEXTURE) -> tuple[np.ndarray, np.ndarray]:
    """Textures with a defect each (even: bright blob of radius 2.5; odd: dark vertical scratch of 7 px)
    at a random place at least 4 px from the border. Returns the images and the defect masks."""
    images = textures(n, seed + 1000, size)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    masks = np.zeros((n, size, size), dtype=bool)
    for i in range(n):
        cy, cx = rng.integers(4, size - 4, size=2)
        if i % 2 == 0:
            masks[i] = (yy - cy) ** 2 + (xx - cx) ** 2 <= 2.5 ** 2
            images[i][masks[i]] = 1.0
        else:
            masks[i, cy - 3:cy + 4, cx] = True
            images[i][masks[i]] = 0.0
    return images, masks


def peak_distance(anomaly_map: np.ndarray, mask: np.ndarray) -> int:
    """Chebyshev distance in pixels from the map's argmax to the nearest defect pixel."""
    py, px = np.unravel_index(int(np.argmax(anomaly_map)), anomaly_map.shape)
    my, mx = np.nonzero(mask)
    return int(np.min(np.maximum(np.abs(my - py), np.abs(mx - px))))


@pytest.fixture(scope="module")
def texture_bundle(tmp_path_factory) -> Path:
    """One grayscale 24x24 bundle trained on 300 normal textures (from a .npy array)."""
    work = tmp_path_factory.mktemp("texture")
    np.save(work / "normal.npy", textures(300, seed=0))
    job = ImageTrainJob(data=work / "normal.npy", name="texture", out_dir=work / "exported", image_size=TEXTURE,
                        channels=1, config=image_config(max_epochs=25, patience=25))
    facts = run_image_training(job)
    assert facts["load_images"] == {"images": 300, "skipped": 0}
    return Path(facts["bundle"])


@pytest.fixture(scope="module")
def texture_eval():
    """100 new normal textures and 100 with defects, as the scorer takes them."""
    normal = as_loaded(textures(100, seed=1))
    defects, masks = with_defects(100, seed=2)
    return normal, as_loaded(defects), masks


# --- 1. one-class detection on handwritten digits ------------------------------------------

# Floors a little below what 80 epochs give (seeds 0..2: class 0 >= 0.9996, 1 >= 0.982, 7 >= 0.986).
DIGIT_FLOORS = {0: 0.98, 1: 0.95, 7: 0.95}
PNG_CLASS = 1  # trained from a folder of PNG files; the others from a .npy array


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits

    data = load_digits()
    return (data.images / 16.0).astype(np.float32), data.target


@pytest.fixture(scope="module", params=sorted(DIGIT_FLOORS))
def digit_run(request, tmp_path_factory, digits):
    """Train on 2/3 of one class's images; return that class, its scores on the held-out third
    plus every other class, and the labels (1 = another digit)."""
    digit = request.param
    images, target = digits
    work = tmp_path_factory.mktemp(f"digit{digit}")
    own = np.random.default_rng(digit).permutation(np.flatnonzero(target == digit))
    cut = len(own) * 2 // 3
    train, held_out = own[:cut], own[cut:]
    if digit == PNG_CLASS:
        data = work / "train"
        for i in train:
            save_png(data / f"digit_{i:04d}.png", images[i])
    else:
        data = work / "train.npy"
        np.save(data, images[train])
    job = ImageTrainJob(data=data, name=f"digit{digit}", out_dir=work / "exported", image_size=8, channels=1,
                        config=image_config(max_epochs=80, patience=80))
    facts = run_image_training(job)
    assert facts["load_images"]["images"] == len(train)

    test = np.concatenate([held_out, np.flatnonzero(target != digit)])
    np.save(work / "test.npy", images[test])
    output = work / "scores.parquet"
    summary = score(ScoreJob(bundle=Path(facts["bundle"]), inputs=(work / "test.npy",), output=output,
                             device="cpu", threads=2))
    scored = pd.read_parquet(output)
    assert summary.rows == len(scored) == len(test)
    return digit, scored, (target[test] != digit).astype(int)


@pytest.mark.slow
def test_one_class_digits_are_told_apart(digit_run):
    digit, scored, labels = digit_run
    assert list(scored.columns) == SCORE_COLUMNS
    # Rows come back in the array's order, named after the file and the index.
    assert [Path(p).name for p in scored["path"]] == [f"test.npy[{i}]" for i in range(len(scored))]
    value = auroc(labels, scored["score"].to_numpy())
    print(f"digit {digit}: AUROC {value:.4f}")
    assert value >= DIGIT_FLOORS[digit], f"digit {digit}: AUROC {value:.4f}"
    # The held-out normals are flagged near the target rate, other digits far more often.
    flagged = scored["is_anomaly"].to_numpy()
    assert flagged[labels == 0].mean() <= 0.25
    assert flagged[labels == 1].mean() >= 0.5


# --- 2. synthetic texture with an injected defect ------------------------------------------


@pytest.mark.slow
def test_texture_defects_score_higher_and_the_map_peaks_on_the_defect(texture_bundle, texture_eval):
    normal, defects, masks = texture_eval
    scorer = session(texture_bundle / "scorer.onnx")
    outputs = dict(zip(IMAGE_OUTPUT_NAMES, scorer.run(None, {IMAGE_INPUT: np.concatenate([normal, defects])})))
    labels = np.r_[np.zeros(len(normal)), np.ones(len(defects))]
    value = auroc(labels, outputs["score"])
    maps = outputs["anomaly_map"][len(normal):]
    assert maps.shape == (len(defects), TEXTURE, TEXTURE)
    distances = np.array([peak_distance(m, mask) for m, mask in zip(maps, masks)])
    hits = float((distances <= 2).mean())
    print(f"texture: AUROC {value:.4f}, anomaly-map peak within 2 px of the defect for {hits:.0%} "
          f"(blobs {np.mean(distances[0::2] <= 2):.0%}, scratches {np.mean(distances[1::2] <= 2):.0%})")
    assert value >= 0.9
    assert hits >= 0.8
    # The map is recon's per-pixel share: it sums to recon.
    np.testing.assert_allclose(outputs["anomaly_map"].reshape(len(labels), -1).sum(axis=1), outputs["recon"],
                               rtol=1e-4)


# --- 3. corrupt files mixed into a folder ---------------------------------------------------


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory) -> tuple[Path, list[str], list[str]]:
    """6 normal and 2 defect PNGs, a truncated PNG, random bytes as .jpg, an empty .png, a .txt."""
    folder = tmp_path_factory.mktemp("mixed") / "incoming"
    good = [save_png(folder / f"normal_{i}.png", image) for i, image in enumerate(textures(6, seed=5))]
    blobs, _ = with_defects(4, seed=6)
    for i in (0, 2):  # bright blobs
        good.append(save_png(folder / "defects" / f"blob_{i}.png", blobs[i]))
    whole = (folder / "normal_0.png").read_bytes()
    bad = [folder / "truncated.png", folder / "random.jpg", folder / "empty.png"]
    bad[0].write_bytes(whole[: len(whole) // 2])
    bad[1].write_bytes(np.random.default_rng(7).integers(0, 256, 2000, dtype=np.uint8).tobytes())
    bad[2].write_bytes(b"")
    (folder / "notes.txt").write_text("not an image\n")
    return folder, sorted(map(str, good)), sorted(map(str, bad))


def test_score_folder_with_corrupt_files(capsys, tmp_path, texture_bundle, mixed_folder):
    folder, good, bad = mixed_folder
    output, maps = tmp_path / "out.parquet", tmp_path / "maps"
    code, out, err = run_main(capsys, "score", texture_bundle, folder, "--output", output, "--maps", maps,
                              "--device", "cpu")
    assert code == 0, err
    scored = pd.read_parquet(output)
    assert list(scored.columns) == SCORE_COLUMNS
    assert sorted(scored["path"]) == good and len(scored) == len(good)
    assert np.isfinite(scored["score"]).all()

    errors = pd.read_csv(errors_path(output))
    assert list(errors.columns) == ["path", "reason"]
    assert sorted(errors["path"]) == bad
    reasons = dict(zip(errors["path"], errors["reason"]))
    assert reasons[str(folder / "empty.png")] == "empty file (0 bytes)"
    assert all(isinstance(r, str) and r.strip() for r in reasons.values())

    summary = json.loads(summary_path(output).read_text())
    assert summary["skipped"] == 3 and summary["rows"] == len(good)
    assert summary["errors_file"] == str(errors_path(output))
    assert "3 unreadable image(s) skipped" in out

    flagged = scored.loc[scored["is_anomaly"], "path"].tolist()
    assert flagged, "the bright-blob images should be flagged, so that maps are written"
    pngs = sorted(maps.glob("*.png"))
    assert len(pngs) == len(flagged) == summary["anomalies"]
    assert sorted(p.name for p in pngs) == sorted(map_name(p) for p in flagged)
    side = TEXTURE * MAP_SCALE
    for png in pngs:
        with Image.open(png) as picture:
            assert picture.mode == "RGB"
            assert picture.size == (3 * side + 2 * _GAP, side)  # image | reconstruction | heat map


def test_a_signal_while_image_scores_are_committed_keeps_scores_summary_and_maps(capsys, monkeypatch, tmp_path,
                                                                                  texture_bundle, mixed_folder):
    """Before: Ctrl-C after the scores were renamed into place left them without their errors file,
    summary and maps, and the CLI said "no output was written"."""
    real_replace = os.replace

    def interrupted_on_the_way(source, target):
        if Path(target).name == "out.parquet":  # the first of the commit's renames
            os.kill(os.getpid(), signal.SIGINT)
        return real_replace(source, target)

    monkeypatch.setattr(os, "replace", interrupted_on_the_way)
    folder, good, _ = mixed_folder
    output, maps = tmp_path / "out.parquet", tmp_path / "maps"
    code, _, err = run_main(capsys, "score", texture_bundle, folder, "--output", output, "--maps", maps,
                            "--device", "cpu")
    assert code == 130
    assert err.strip().splitlines()[-1].startswith("error: interrupted after the output was written whole")
    summary = json.loads(summary_path(output).read_text())
    assert summary["rows"] == len(pd.read_parquet(output)) == len(good) and errors_path(output).exists()
    assert len(list(maps.glob("*.png"))) == summary["anomalies"] > 0


def test_ctrl_c_while_images_are_scored_stops_between_batches_with_no_output(capsys, monkeypatch, tmp_path,
                                                                             texture_bundle, mixed_folder):
    """Before: the KeyboardInterrupt was raised wherever the main thread was, inside onnxruntime's or
    Pillow's work among the reader and writer threads (a crash at exit on tables). Now the batch
    being scored ends, and the run stops before the next one, leaving nothing."""
    import onnxruntime as ort

    real_run, finished = ort.InferenceSession.run, []

    def interrupted_run(self, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        outputs = real_run(self, *args, **kwargs)
        finished.append(True)  # not reached if the signal stops the run here
        return outputs

    monkeypatch.setattr(ort.InferenceSession, "run", interrupted_run)
    folder, _, _ = mixed_folder
    output = tmp_path / "scores" / "out.parquet"
    code, _, err = run_main(capsys, "score", texture_bundle, folder, "--output", output, "--device", "cpu")
    assert code == 130 and err.strip().splitlines()[-1] == "error: interrupted; no output was written"
    assert finished == [True]  # the batch it came in was scored, and none after it
    assert not (tmp_path / "scores").exists()


def test_an_image_summary_that_cannot_be_written_leaves_the_earlier_output(monkeypatch, tmp_path, texture_bundle,
                                                                          mixed_folder):
    """The scores were renamed into place and the earlier errors file deleted and written anew
    before the summary: a full disk then left new scores and errors beside the earlier summary."""
    disk_full_when_writing(monkeypatch, "out.summary.json")
    folder, _, _ = mixed_folder
    output, maps = tmp_path / "out.parquet", tmp_path / "maps"
    earlier = {output: b"earlier scores", summary_path(output): b"earlier summary", errors_path(output): b"earlier errors"}
    for path, content in earlier.items():
        path.write_bytes(content)
    with pytest.raises(OSError, match="No space left"):
        score(ScoreJob(texture_bundle, (folder,), output, device="cpu", maps_dir=maps))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in earlier)  # no maps, no temp files
    assert {path: path.read_bytes() for path in earlier} == earlier


def test_a_run_without_unreadable_images_removes_an_earlier_errors_file(tmp_path, texture_bundle):
    """Beside scores that skipped nothing, an earlier run's list of unreadable images would mislead:
    it goes at the commit, with the scores and summary renamed into place."""
    folder = tmp_path / "clean"
    for i, image in enumerate(textures(2, seed=12)):
        save_png(folder / f"normal_{i}.png", image)
    output = tmp_path / "out" / "scores.parquet"
    output.parent.mkdir()
    errors_path(output).write_text("earlier errors")
    score(ScoreJob(texture_bundle, (folder,), output, device="cpu"))
    assert sorted(p.name for p in output.parent.iterdir()) == ["scores.parquet", "scores.summary.json"]
    assert json.loads(summary_path(output).read_text())["errors_file"] is None


# --- 4. empty folders; other sizes and modes ------------------------------------------------


@pytest.mark.parametrize("content", ["empty", "no-images"])
def test_train_and_score_without_images_fail_with_one_line(capsys, tmp_path, texture_bundle, content):
    folder = tmp_path / "nothing"
    folder.mkdir()
    if content == "no-images":
        (folder / "readme.txt").write_text("no pictures here\n")
        (folder / "table.csv").write_text("a,b\n1,2\n")
    out_dir = tmp_path / "exported"
    code, _, err = run_main(capsys, "train", folder, "--name", "nothing", "--image-size", 24, "--out", out_dir)
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(folder) in lines[0], err
    assert "Traceback" not in err
    assert not (out_dir / "nothing").exists()

    output = tmp_path / "scores.parquet"
    code, _, err = run_main(capsys, "score", texture_bundle, folder, "--output", output)
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(folder) in lines[0], err
    assert not output.exists() and not summary_path(output).exists()


def test_other_sizes_and_modes_score_without_error(capsys, tmp_path, texture_bundle):
    base = textures(2, seed=8, size=40)
    folder = tmp_path / "various"
    save_png(folder / "gray_24.png", textures(1, seed=9)[0])
    save_png(folder / "rgb_24.png", np.repeat(textures(1, seed=9)[0][..., None], 3, axis=2))  # same pixels, RGB
    save_png(folder / "gray_40.png", base[0])
    save_png(folder / "rgb_40.png", np.stack([base[1], base[1] * 0.5, base[1] ** 2], axis=2))
    Image.fromarray(np.rint(base[0] * 255).astype(np.uint8)).convert("RGBA").save(folder / "rgba_40.png")
    Image.fromarray(np.rint(base[1][:30] * 255).astype(np.uint8)).convert("RGB").save(folder / "jpeg_40x30.jpg",
                                                                                       quality=95)
    output = tmp_path / "scores.csv"
    code, _, err = run_main(capsys, "score", texture_bundle, folder, "--output", output, "--device", "cpu")
    assert code == 0, err
    scored = pd.read_csv(output)
    assert len(scored) == 6 and np.isfinite(scored["score"]).all()
    assert not errors_path(output).exists()
    assert json.loads(summary_path(output).read_text())["skipped"] == 0
    by_name = scored.set_index(scored["path"].map(lambda p: Path(p).name))["score"]
    # An RGB file with R = G = B converts to exactly the grayscale pixels.
    assert by_name["rgb_24.png"] == by_name["gray_24.png"]


@pytest.mark.parametrize("report", [False, True], ids=["plain", "report"])
def test_an_image_with_corrupt_exif_is_scored_with_one_warning_line_naming_it(capsys, tmp_path, texture_bundle,
                                                                              report):
    """Scoring printed Pillow's two-line warning, naming Pillow's own file and not the image; the
    report, reading the top images again, warned a second time."""
    folder = tmp_path / "camera"
    save_png(folder / "good.png", textures(1, seed=9)[0])
    exif = b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\x00\x05\x01\x12\x00\x03\x00\x00\x00\x01\x00\x06"  # cut short
    Image.fromarray(np.rint(textures(1, seed=10)[0] * 255).astype(np.uint8)).save(folder / "bad.jpg", exif=exif)
    output = tmp_path / "scores.csv"
    code, _, err = run_main(capsys, "score", texture_bundle, folder, "--output", output, "--device", "cpu",
                            *(["--report"] if report else []))
    assert code == 0, err
    assert sorted(pd.read_csv(output)["path"]) == [str(folder / "bad.jpg"), str(folder / "good.png")]
    [line] = err.splitlines()
    assert line.startswith(f"warning: {folder / 'bad.jpg'}: corrupt EXIF data (expecting to read 12 bytes but only "
                           f"got 10); no orientation could be read from it, so it is used as stored, not rotated; ")


# --- 5. ONNX parity -------------------------------------------------------------------------

PARITY_BATCHES = [1, 7, 64]


@pytest.fixture(scope="module")
def torch_graph(texture_bundle):
    """The PyTorch image scorer rebuilt from what the bundle ships: weights from the ONNX initializers."""
    bundle = Bundle.load(texture_bundle)
    model = bundle.manifest["model"]
    vae = ConvVAE(model["channels"], model["size"], model["latent_dim"])
    keys = set(vae.state_dict())
    state = {}
    for name in ("encoder", "decoder"):
        for init in onnx.load(str(texture_bundle / f"{name}.onnx")).graph.initializer:
            if f"{name}.{init.name}" in keys:
                state[f"{name}.{init.name}"] = torch.from_numpy(onnx.numpy_helper.to_array(init).copy())
    # decoder.onnx has no use for the likelihood scale; the scorer carries it as vae.decoder.log_scale.
    for init in onnx.load(str(texture_bundle / "scorer.onnx")).graph.initializer:
        if init.name.startswith("vae.") and init.name[4:] in keys and init.name[4:] not in state:
            state[init.name[4:]] = torch.from_numpy(onnx.numpy_helper.to_array(init).copy())
    assert set(state) == keys, f"not found in the ONNX files: {sorted(keys - set(state))}"
    vae.load_state_dict(state)
    return ImageScorerGraph(vae.eval(), bundle.manifest["score"]["kl_weight"], bundle.calibration).eval()


@pytest.fixture(scope="module")
def parity_images(texture_eval):
    normal, defects, _ = texture_eval
    # Alternate normal and defect images so every batch has both.
    return np.ascontiguousarray(np.stack([normal[:32], defects[:32]], axis=1).reshape(64, 1, TEXTURE, TEXTURE))


@pytest.mark.parametrize("n", PARITY_BATCHES)
def test_scorer_matches_pytorch(texture_bundle, torch_graph, parity_images, n):
    images = parity_images[:n]
    actual = dict(zip(IMAGE_OUTPUT_NAMES, session(texture_bundle / "scorer.onnx").run(None, {IMAGE_INPUT: images})))
    with torch.no_grad():
        expected = dict(zip(IMAGE_OUTPUT_NAMES, (t.numpy() for t in torch_graph(torch.from_numpy(images)))))
    for name in ("score", "recon", "kl", "anomaly_map", "reconstruction"):
        assert actual[name].shape == expected[name].shape, name
        np.testing.assert_allclose(actual[name], expected[name], rtol=1e-4, atol=1e-4, err_msg=name)
    # PyTorch's p-values and decisions may differ from the graph's (which decide, and whose scores the
    # table holds) only where a score ties a calibration score within float noise.
    calibration = torch_graph.table.scores.numpy()[: torch_graph.table.n]
    steady = np.array([np.all(np.abs(calibration - s) > 1e-4 * max(1.0, abs(s))) for s in expected["score"]])
    np.testing.assert_array_equal(actual["p_value"][steady], expected["p_value"][steady])
    np.testing.assert_array_equal(actual["is_anomaly"][steady], expected["is_anomaly"][steady])


def test_the_bundle_flags_its_own_calibration_images_as_calibrated(tmp_path, texture_bundle):
    """Before: the threshold and the table were PyTorch's scores, which scorer.onnx's differ from
    by about 1e-7 relative: scoring its own calibration images, the bundle flagged the threshold's
    own image in 2 of 4 small bundles (rank of them, not rank - 1), and gave 6 to 15 of their 39
    images a p-value a step off their rank."""
    output = tmp_path / "calibration.parquet"
    score(ScoreJob(bundle=texture_bundle, inputs=(texture_bundle / CALIBRATION_IMAGES,), output=output, device="cpu"))
    scored = pd.read_parquet(output)
    cal = Bundle.load(texture_bundle).calibration
    scores, flagged = scored["score"].to_numpy(), scored["is_anomaly"].to_numpy()
    np.testing.assert_array_equal(np.sort(scores), cal.scores)  # the table holds the bundle's own scores
    assert len(np.unique(scores)) == cal.n and cal.rank >= 2
    assert flagged.sum() == cal.rank - 1
    descending = np.argsort(-scores)
    np.testing.assert_array_equal(scored["p_value"].to_numpy()[descending],
                                  np.arange(2, cal.n + 2, dtype=np.float32) / np.float32(cal.n + 1))
    assert Bundle.load(texture_bundle).manifest["verification"]["consistency"]["flagged"] == cal.rank - 1


@pytest.mark.parametrize("n", PARITY_BATCHES)
def test_encoder_and_decoder_match_pytorch(texture_bundle, torch_graph, parity_images, n):
    images = parity_images[:n]
    mu, logvar = session(texture_bundle / "encoder.onnx").run(None, {"images": images})
    (reconstruction,) = session(texture_bundle / "decoder.onnx").run(None, {"z": mu})
    with torch.no_grad():
        t_mu, t_logvar = torch_graph.vae.encoder(torch.from_numpy(images))
        t_reconstruction = torch_graph.vae.decoder(t_mu)
    np.testing.assert_allclose(mu, t_mu.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(logvar, t_logvar.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(reconstruction, t_reconstruction.numpy(), rtol=1e-4, atol=1e-4)
    assert reconstruction.shape == (n, 1, TEXTURE, TEXTURE)


def test_manifest_and_graph_contract(texture_bundle):
    manifest = Bundle.load(texture_bundle).manifest
    assert manifest["modality"] == "image"
    assert manifest["verification"]["passed"] is True
    assert manifest["image"]["size"] == TEXTURE and manifest["image"]["channels"] == 1
    assert manifest["onnx"]["scorer_outputs"] == list(IMAGE_OUTPUT_NAMES)
    assert manifest["onnx"]["cuda_provider_options"]["use_tf32"] == "0"  # convolutions exact on CUDA too
    for name in ("encoder.onnx", "decoder.onnx", "scorer.onnx"):
        model = onnx.load(str(texture_bundle / name))
        assert model.ir_version == 10
        props = {p.key: p.value for p in model.metadata_props}
        assert props["vaeguard.modality"] == "image"
        assert float(props["vaeguard.threshold"]) == manifest["calibration"]["threshold"]
        for value in list(model.graph.input) + list(model.graph.output):
            dims = value.type.tensor_type.shape.dim
            assert dims[0].dim_param == "batch_size", (name, value.name)
    scorer = session(texture_bundle / "scorer.onnx")
    assert [i.name for i in scorer.get_inputs()] == [IMAGE_INPUT]
    assert scorer.get_inputs()[0].shape == ["batch_size", 1, TEXTURE, TEXTURE]
    assert [o.name for o in scorer.get_outputs()] == list(IMAGE_OUTPUT_NAMES)


def test_only_the_batch_axis_is_named_batch_size(texture_bundle):
    """A graph output declaring [batch_size, 1, batch_size, ...] claims height == batch size,
    which misleads any consumer that plans buffers or engines from the declared shapes."""
    wrong = []
    for name in ("encoder.onnx", "decoder.onnx", "scorer.onnx"):
        model = onnx.load(str(texture_bundle / name))
        for value in list(model.graph.input) + list(model.graph.output):
            shape = [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
            if "batch_size" in shape[1:]:
                wrong.append(f"{name}: {value.name} {shape}")
    assert not wrong, f"non-batch axes named batch_size: {wrong}"


def test_scores_are_identical_across_runs(tmp_path, texture_bundle, mixed_folder):
    folder = mixed_folder[0]
    first, second = tmp_path / "first.parquet", tmp_path / "second.parquet"
    score(ScoreJob(bundle=texture_bundle, inputs=(folder,), output=first, device="cpu"))
    score(ScoreJob(bundle=texture_bundle, inputs=(folder,), output=second, device="cpu", batch_size=3))
    pd.testing.assert_frame_equal(pd.read_parquet(first), pd.read_parquet(second))


def test_an_image_scores_the_same_whatever_batch_or_threads_it_is_scored_with(tmp_path, texture_bundle):
    """onnxruntime's Elu gave last-bit differences with the work split among threads, so a score moved
    with the batch size and with the images before it (an unreadable one shifted every batch)."""
    folder = tmp_path / "incoming"
    for i, image in enumerate(textures(40, seed=11)):
        save_png(folder / f"img_{i:02d}.png", image)
    runs = []
    for threads, batch_size in [(1, 256), (4, 1), (4, 5), (4, 7), (4, 256), (2, 3)]:
        output = tmp_path / f"t{threads}-b{batch_size}.parquet"
        score(ScoreJob(bundle=texture_bundle, inputs=(folder,), output=output, device="cpu", threads=threads,
                       batch_size=batch_size))
        runs.append(pd.read_parquet(output))
    for run in runs[1:]:
        pd.testing.assert_frame_equal(run, runs[0], check_exact=True)


# --- 6. an RGB folder through the CLI -------------------------------------------------------

RGB_YAML = """\
training:
  max_epochs: 3
  patience: 3
  batch_size: 32
  threads: 2
  progress: false
calibration:
  target_fpr: 0.05
"""


@pytest.fixture(scope="module")
def rgb_cli(tmp_path_factory):
    """`vaeguard train DIR --image-size 16 --channels 3` on 100 colour images of 20x20."""
    import contextlib
    import io

    work = tmp_path_factory.mktemp("rgb")
    folder = work / "colours"
    rng = np.random.default_rng(3)
    base = textures(100, seed=3, size=20)
    for i, gray in enumerate(base):
        tint = rng.uniform(0.5, 1.0, size=3)
        save_png(folder / f"c{i // 50}" / f"img_{i:03d}.png", gray[..., None] * tint)
    config = work / "fast.yaml"
    config.write_text(RGB_YAML)
    out_dir = work / "exported"
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main(["train", str(folder), "--name", "colours", "--image-size", "16", "--channels", "3",
                     "--config", str(config), "--out", str(out_dir)])
    return {"code": code, "out": stdout.getvalue(), "err": stderr.getvalue(), "folder": folder,
            "bundle": out_dir / "colours", "work": work}


def test_rgb_folder_trains_and_scores_via_the_cli(capsys, rgb_cli):
    assert rgb_cli["code"] == 0, rgb_cli["err"]
    assert "100 images" in rgb_cli["out"] and "3 epochs" in rgb_cli["out"]
    bundle = rgb_cli["bundle"]
    manifest = Bundle.load(bundle).manifest
    assert manifest["image"]["channels"] == 3
    assert manifest["image"]["size"] == 16 and manifest["image"]["mode"] == "RGB"
    assert manifest["model"]["channels"] == 3 and manifest["training"]["epochs"] == 3
    assert manifest["verification"]["passed"] is True
    assert manifest["config"]["training"]["max_epochs"] == 3
    assert session(bundle / "scorer.onnx").get_inputs()[0].shape == ["batch_size", 3, 16, 16]
    assert sorted(p.name for p in bundle.iterdir()) == ["calibration_images.npy", "decoder.onnx", "encoder.onnx",
                                                        "manifest.json", "report.html", "report_files", "scorer.onnx"]
    assert not [p for p in bundle.parent.iterdir() if p.name.startswith(".")]  # no run folder left behind

    output = rgb_cli["work"] / "scores.parquet"
    code, out, err = run_main(capsys, "score", bundle, rgb_cli["folder"], "--output", output, "--device", "cpu")
    assert code == 0, err
    scored = pd.read_parquet(output)
    assert list(scored.columns) == SCORE_COLUMNS and len(scored) == 100
    assert "100 rows" in out


def test_inspect_an_image_bundle(capsys, rgb_cli):
    assert rgb_cli["code"] == 0, rgb_cli["err"]
    bundle = rgb_cli["bundle"]
    manifest = Bundle.load(bundle).manifest
    code, out, err = run_main(capsys, "inspect", bundle, "--json")
    assert code == 0, err
    assert json.loads(out) == manifest
    code, out, err = run_main(capsys, "inspect", bundle)
    assert code == 0, err
    assert "colours" in out and f"{manifest['calibration']['threshold']:.6g}" in out
    assert "images: 16x16, mode RGB" in out and "convolutional VAE 3x16x16" in out


# --- 7. outputs that are inputs, maps of failed runs, undecodable names ----------------------


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def test_image_list_scored_onto_itself_is_refused(capsys, tmp_path, texture_bundle):
    folder = tmp_path / "images"
    for i, image in enumerate(textures(2, seed=9)):
        save_png(folder / f"img_{i}.png", image)
    listing = tmp_path / "list.csv"
    listing.write_text("path\nimages/img_0.png\nimages/img_1.png\n")
    before = listing.read_text()
    code, _, err = run_main(capsys, "score", texture_bundle, listing, "--output", listing, "--device", "cpu")
    assert code == 1 and str(listing) in one_error_line(err)
    assert listing.read_text() == before and not summary_path(listing).exists()


def test_errors_file_of_the_output_as_input_is_refused_before_it_is_deleted(capsys, tmp_path, texture_bundle):
    save_png(tmp_path / "images" / "img_0.png", textures(1, seed=9)[0])
    output = tmp_path / "res.csv"
    listing = errors_path(output)  # res.errors.csv, a list of images the user wants scored
    listing.write_text("path\nimages/img_0.png\n")
    code, _, err = run_main(capsys, "score", texture_bundle, listing, "--output", output, "--device", "cpu")
    assert code == 1 and "errors file" in one_error_line(err)
    assert listing.read_text() == "path\nimages/img_0.png\n" and not output.exists()


def test_maps_folder_that_is_an_input_or_a_file_is_refused_up_front(capsys, tmp_path, texture_bundle):
    folder = tmp_path / "images"
    save_png(folder / "img_0.png", textures(1, seed=9)[0])
    maps_file = tmp_path / "mapsfile"
    maps_file.write_text("not a folder\n")
    output = tmp_path / "m2" / "s.csv"
    code, _, err = run_main(capsys, "score", texture_bundle, folder, "--output", output, "--maps", maps_file,
                            "--device", "cpu")
    assert code == 1 and "--maps" in one_error_line(err) and str(maps_file) in err
    assert not output.parent.exists() and maps_file.read_text() == "not a folder\n"
    code, _, err = run_main(capsys, "score", texture_bundle, folder, "--output", output, "--maps", folder,
                            "--device", "cpu")
    assert code == 1 and "--maps" in one_error_line(err)
    assert not output.parent.exists() and sorted(p.name for p in folder.iterdir()) == ["img_0.png"]


def test_maps_link_to_a_missing_folder_is_refused_before_the_scores_are_written(capsys, tmp_path, texture_bundle):
    """It failed when the maps were published, with an unexpected FileExistsError, after writing the scores."""
    folder = tmp_path / "defects"
    save_png(folder / "blob_0.png", with_defects(2, seed=6)[0][0])  # flagged, so there is a map to publish
    link = tmp_path / "maps"
    link.symlink_to(tmp_path / "gone")
    output = tmp_path / "out" / "s.csv"
    code, _, err = run_main(capsys, "score", texture_bundle, folder, "--output", output, "--maps", link,
                            "--device", "cpu")
    assert code == 1 and "does not exist" in one_error_line(err) and str(link) in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["defects", "maps"]


def test_pngs_written_inside_an_input_folder_are_refused_up_front(capsys, tmp_path, texture_bundle):
    """Maps (or report figures) inside a scored folder were scored as images by the next run, flagged,
    and mapped again: every night the folder grew and the anomaly rate rose."""
    folder = tmp_path / "images"
    images = [save_png(folder / "blob_0.png", with_defects(2, seed=6)[0][0]),  # flagged: a map is drawn
              save_png(folder / "img_0.png", textures(1, seed=9)[0])]
    output = tmp_path / "out" / "s.csv"
    for option, argv in [("--maps", ["--output", output, "--maps", folder / "nightly" / "maps"]),
                         ("--report", ["--output", folder / "s.csv", "--report"])]:
        code, _, err = run_main(capsys, "score", texture_bundle, folder, *argv, "--device", "cpu")
        line = one_error_line(err)
        assert code == 1 and option in line and str(folder) in line
        assert sorted(tmp_path.rglob("*")) == [folder, *images]
    # A hidden folder is never listed, so maps may go there, and the next run scores the same images.
    for _ in range(2):
        code, _, err = run_main(capsys, "score", texture_bundle, folder, "--output", output, "--maps",
                                folder / ".maps", "--device", "cpu")
        assert code == 0, err
        assert pd.read_csv(output)["path"].tolist() == list(map(str, images))
        assert [p.name for p in (folder / ".maps").iterdir()] == [map_name(str(images[0]))]


def test_failed_run_leaves_no_maps_and_keeps_the_old_ones(capsys, tmp_path, texture_bundle):
    blobs, _ = with_defects(2, seed=6)
    folder = tmp_path / "defects"
    save_png(folder / "blob_0.png", blobs[0])  # a bright blob: flagged, so a map is drawn
    bad = tmp_path / "badvals.npy"
    np.save(bad, np.full((2, TEXTURE, TEXTURE), 2.0, dtype=np.float32))  # outside [0, 1]: fails the run
    maps = tmp_path / "out" / "maps"
    maps.mkdir(parents=True)
    (maps / "earlier.png").write_bytes(b"from an earlier run")
    output = tmp_path / "out" / "s.csv"
    code, _, err = run_main(capsys, "score", texture_bundle, folder, bad, "--output", output, "--maps", maps,
                            "--device", "cpu")
    assert code == 1 and str(bad) in one_error_line(err)
    assert sorted(p.name for p in maps.iterdir()) == ["earlier.png"]
    assert sorted(p.name for p in maps.parent.iterdir()) == ["maps"]  # no staging folder, no output

    code, _, err = run_main(capsys, "score", texture_bundle, folder, "--output", output, "--maps", maps,
                            "--device", "cpu")
    assert code == 0, err
    assert sorted(p.name for p in maps.iterdir()) == ["earlier.png", map_name(str(folder / "blob_0.png"))]
    assert sorted(p.name for p in maps.parent.iterdir()) == ["maps", "s.csv", "s.summary.json"]


def test_a_folder_where_a_map_goes_fails_the_run_before_anything_is_replaced(capsys, tmp_path, texture_bundle):
    """The maps were moved in one by one after the scores' commit: a folder named like a map failed the
    run there, with an unexpected IsADirectoryError, after the scores and the maps before it were
    replaced. Now the maps go in the scores' commit, which checks every target first."""
    blobs, _ = with_defects(6, seed=6)
    folder = tmp_path / "defects"
    images = [save_png(folder / f"blob_{i}.png", blobs[i]) for i in (0, 2, 4)]  # bright blobs: flagged
    output, maps = tmp_path / "out" / "s.csv", tmp_path / "out" / "maps"
    code, _, err = run_main(capsys, "score", texture_bundle, folder, "--output", output, "--maps", maps,
                            "--device", "cpu")
    assert code == 0, err
    names = sorted(map_name(str(image)) for image in images)
    assert sorted(p.name for p in maps.iterdir()) == names
    earlier = {path: b"earlier" for path in [output, summary_path(output), *(maps / name for name in names[:2])]}
    for path, content in earlier.items():
        path.write_bytes(content)
    (maps / names[2]).unlink()
    (maps / names[2]).mkdir()  # a folder where the last map goes
    code, _, err = run_main(capsys, "score", texture_bundle, folder, "--output", output, "--maps", maps,
                            "--device", "cpu")
    assert code == 1 and str(maps / names[2]) in one_error_line(err) and "is a folder" in err
    assert {path: path.read_bytes() for path in earlier} == earlier
    assert sorted(p.name for p in maps.iterdir()) == names and (maps / names[2]).is_dir()  # no staging folder
    assert sorted(p.name for p in output.parent.iterdir()) == ["maps", "s.csv", "s.summary.json"]


def test_maps_into_a_folder_that_links_to_another_file_system(capsys, tmp_path, texture_bundle):
    """The maps were staged beside the maps folder and moved into where it links to: across file
    systems, os.replace failed (EXDEV) after the scores were in place."""
    elsewhere = Path("/dev/shm")
    if not elsewhere.is_dir() or os.stat(elsewhere).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("needs /dev/shm on another file system than the test's folder")
    folder = tmp_path / "defects"
    image = save_png(folder / "blob_0.png", with_defects(2, seed=6)[0][0])  # flagged
    target = elsewhere / f"vaeguard-maps-{os.getpid()}-{tmp_path.name}"
    target.mkdir()
    try:
        (tmp_path / "maps").symlink_to(target)
        code, _, err = run_main(capsys, "score", texture_bundle, folder, "--output", tmp_path / "s.csv", "--maps",
                                tmp_path / "maps", "--device", "cpu")
        assert code == 0, err
        assert [p.name for p in target.iterdir()] == [map_name(str(image))]
    finally:
        shutil.rmtree(target)


def test_failed_run_leaves_no_folders_it_created(capsys, tmp_path, texture_bundle):
    blobs, _ = with_defects(2, seed=6)
    folder = tmp_path / "defects"
    save_png(folder / "blob_0.png", blobs[0])  # flagged: its map is drawn before the run fails
    bad = tmp_path / "badvals.npy"
    np.save(bad, np.full((2, TEXTURE, TEXTURE), 2.0, dtype=np.float32))
    code, _, err = run_main(capsys, "score", texture_bundle, folder, bad, "--output", tmp_path / "o1" / "s.csv",
                            "--maps", tmp_path / "m1" / "nightly" / "maps", "--device", "cpu")
    assert code == 1 and str(bad) in one_error_line(err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["badvals.npy", "defects"]


def test_a_manifest_threshold_the_image_scorer_does_not_use_is_refused(capsys, tmp_path, texture_bundle):
    """The threshold is baked into scorer.onnx: an "adjusted" one in the manifest was reported, not used."""
    import shutil

    bundle = shutil.copytree(texture_bundle, tmp_path / "bundle")
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["calibration"]["threshold"] *= 2
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    save_png(tmp_path / "images" / "img_0.png", textures(1, seed=9)[0])
    code, _, err = run_main(capsys, "score", bundle, tmp_path / "images", "--output", tmp_path / "s.csv",
                            "--device", "cpu")
    assert code == 1 and "its threshold is" in one_error_line(err) and not (tmp_path / "s.csv").exists()


def test_file_names_that_are_not_utf8_are_scored_and_recorded(capsys, tmp_path, texture_bundle):
    folder = tmp_path / "incoming"
    save_png(folder / "plain.png", textures(1, seed=9)[0])
    good = os.fsdecode(os.fsencode(folder) + b"/caf\xe9.png")
    save_png(Path(good), textures(1, seed=10)[0])
    broken = os.fsencode(folder) + b"/bro\xefken.png"
    with open(broken, "wb") as handle:
        handle.write(b"not an image")
    output = tmp_path / "out.csv"
    code, _, err = run_main(capsys, "score", texture_bundle, folder, "--output", output, "--device", "cpu")
    assert code == 0, err
    scored = pd.read_csv(output)
    assert sorted(scored["path"]) == sorted([f"{folder}/caf\\xe9.png", str(folder / "plain.png")])
    errors = pd.read_csv(errors_path(output))
    assert errors["path"].tolist() == [f"{folder}/bro\\xefken.png"]


def test_when_no_image_can_be_read_the_error_says_why(capsys, tmp_path, texture_bundle):
    """A run where every image fails writes no errors file, so its one line carries the first reason."""
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "a.png").write_bytes(b"not a png at all")
    (folder / "b.png").write_bytes(b"")
    code, _, err = run_main(capsys, "score", texture_bundle, folder, "--output", tmp_path / "out.csv",
                            "--device", "cpu")
    line = one_error_line(err)
    assert code == 1 and "none of the 2 image file(s) could be read (first: " in line
    assert str(folder / "a.png") in line
    assert not (tmp_path / "out.csv").exists()


def test_a_folder_holding_the_bundle_is_refused_before_its_report_figures_are_scored(capsys, tmp_path,
                                                                                        texture_bundle):
    """`vaeguard score exported/parts .` scored the bundle's report PNGs as images (and flagged them)."""
    folder = tmp_path / "line"
    save_png(folder / "img_0.png", textures(1, seed=9)[0])
    bundle = shutil.copytree(texture_bundle, folder / "exported" / "texture")
    assert list((bundle / "report_files").glob("*.png"))  # what would have been scored
    output = tmp_path / "out" / "s.csv"
    code, _, err = run_main(capsys, "score", bundle, folder, "--output", output, "--device", "cpu")
    assert code == 1 and f"{folder}: holds the bundle {bundle}, whose report figures" in one_error_line(err)
    assert not output.parent.exists()
