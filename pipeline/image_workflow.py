"""The training run for images: the same steps, splits, calibration, export checks and atomic
publishing as for tables (pipeline.workflow), with image loading and a convolutional VAE.

Images are loaded once, preprocessed as the manifest will say (pipeline.images), and kept in
the run folder as one float32 array; unreadable files are skipped and counted, never fatal.
"""

from __future__ import annotations

import json
import logging
import os
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from pipeline.bundle import CALIBRATION_IMAGES, FORMAT, FORMAT_VERSION, MODEL_FILES, write_new_manifest
from pipeline.calibrate import Calibration, calibrate, min_calibration_rows, placeholder_calibration
from pipeline.config import ImageTrainJob
from pipeline.contract import IMAGE_INPUT, IMAGE_OUTPUT_NAMES, IR_VERSION, OPSET, cuda_settings
from pipeline.errors import ConfigError, DataError
from pipeline.export import export_image_encoder_decoder, export_image_scorer, set_metadata, write_calibrated_scorer
from pipeline.image_model import ConvVAE
from pipeline.images import ImageNotes, ImageSource, ImageSpec, iter_image_batches, list_images, searched_by
from pipeline.images import load_images as read_images  # `load_images` is this module's step
from pipeline.precision import IMAGE_CHUNK, score_in_chunks
from pipeline.runtime import create_session
from pipeline.scorer_graph import ImageScorerGraph
from pipeline.splits import rows_needed, split_rows
from pipeline.train import train_vae
from pipeline.verify import verify_image_export
from pipeline.workflow import RunDir, load_splits, read_json, record_verification, run_steps, write_json, write_training_report

log = logging.getLogger("vaeguard")

DEFAULT_LATENT = 16
LOAD_BATCH = 512
LOAD_BYTES = 256 * 2**20
COLOUR_SPREAD = 0.02  # about 5 of 255 levels


def _spec(job: ImageTrainJob) -> ImageSpec:
    return ImageSpec(size=job.image_size, channels=job.channels)


def load_run_images(run: RunDir) -> np.ndarray:
    return np.load(run.root / "images.npy", mmap_mode="r")


def _check_count(job: ImageTrainJob, n: int, reason: str) -> None:
    """Fail, in terms of images, where the splits could not be made from ``n`` of them."""
    try:
        split_rows(None, n, job.config.calibration, job.config.training, str(job.data))
    except DataError:
        target = job.config.calibration.target_fpr
        raise DataError(f"{job.data}: too few images to train and calibrate: {reason}, need at least "
                        f"{rows_needed(job.config.calibration, job.config.training, labelled=False)} for target "
                        f"FPR {target} (calibration alone needs {min_calibration_rows(target)}); add images or "
                        f"raise --target-fpr") from None


def load_images(job: ImageTrainJob, run: RunDir) -> dict:
    """Find and preprocess every image; skip unreadable ones with their reason."""
    _check_bundle_outside(job)
    source = list_images(job.data, job.path_column)
    # Before decoding anything: a folder that is too small fails in a second, not after a long load.
    _check_count(job, len(source), f"{len(source)} listed")
    _warn_duplicates(job, source)
    spec = _spec(job)
    _check_memory(job, spec, len(source))
    target = run.root / "images.npy"
    # Written batch by batch into a file, not concatenated in memory: peak memory stays one batch,
    # not twice the whole set.
    stored = np.lib.format.open_memmap(target, mode="w+", dtype=np.float32, shape=(len(source), *spec.shape))
    names, errors = [], []
    notes = ImageNotes()  # warnings about images that were loaded, said once for the whole set
    for images, ok, bad in iter_image_batches(source, spec, _load_batch(spec), notes):
        stored[len(names):len(names) + len(ok)] = images
        names += ok
        errors += bad
    stored.flush()
    del stored
    notes.log(str(job.data))
    if spec.channels == 1:
        _warn_colour(job, source, spec)
    for item, reason in errors:
        log.debug("skipped %s: %s", item, reason)
    if errors:
        log.warning("%s: skipped %d unreadable image(s), e.g. %s: %s", job.data, len(errors), *errors[0])
        _check_count(job, len(names), f"{len(names)} of {len(source)} could be read ({len(errors)} skipped, "
                                      f"e.g. {errors[0][0]}: {errors[0][1]}; all with --verbose)")
        _shrink(target, len(names))
    write_json(run.root / "images.json", {"names": names, "skipped": [list(e) for e in errors]})
    return {"images": len(names), "skipped": len(errors)}


def _check_bundle_outside(job: ImageTrainJob) -> None:
    # The bundle's report figures are PNGs: published inside the image folder (`vaeguard train .`
    # with the default --out), the next training or scoring of that folder takes them for images.
    if searched_by(job.data, job.bundle_dir):
        raise ConfigError(f"--out {job.out_dir}: the bundle would go to {job.bundle_dir}, inside the image folder "
                          f"{job.data}, whose next training or scoring would take its report figures for images; "
                          f"pass an --out outside {job.data}")


def _shrink(path: Path, n: int) -> None:
    """Keep the first ``n`` images of the .npy at ``path`` (the slots of skipped files are unused)."""
    full = np.load(path, mmap_mode="r")
    kept = np.lib.format.open_memmap(path.with_name("kept.npy"), mode="w+", dtype=full.dtype,
                                     shape=(n, *full.shape[1:]))
    step = _load_batch(ImageSpec(size=full.shape[2], channels=full.shape[1]))
    for start in range(0, n, step):
        kept[start:start + step] = full[start:min(start + step, n)]
    kept.flush()
    del kept, full
    path.with_name("kept.npy").replace(path)


def _image_bytes(spec: ImageSpec) -> int:
    return 4 * spec.channels * spec.size ** 2  # float32


def _load_batch(spec: ImageSpec) -> int:
    # At most LOAD_BATCH images and about LOAD_BYTES: 512 RGB images of 1024x1024 would be 6 GB.
    return max(1, min(LOAD_BATCH, LOAD_BYTES // _image_bytes(spec)))


def _physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows) or no such name
        return None


def _check_memory(job: ImageTrainJob, spec: ImageSpec, n: int) -> None:
    # Training holds every training and validation image in memory at once; a set that cannot
    # fit (often a typo in --image-size) must fail now, not swap the machine for an hour first.
    needed, memory = n * _image_bytes(spec), _physical_memory()
    if memory and needed > memory:
        raise ConfigError(f"{job.data}: {n:,} images at {spec.size}x{spec.size} with {spec.channels} channel(s) "
                          f"need {needed / 2**30:,.1f} GiB as float32, more than this machine's "
                          f"{memory / 2**30:,.1f} GiB of memory; use a smaller --image-size or fewer images")


def _warn_colour(job: ImageTrainJob, source: ImageSource, spec: ImageSpec, sample: int = 16) -> None:
    # --channels defaults to 1, so colour photos train a grayscale model without a word, and a
    # defect that differs only in colour then scores as normal. A few images tell.
    if source.kind == "npy":
        if source.layout == "NHW":
            return
        picked = ImageSource(items=source.items[:sample], kind="npy", origin=source.origin, layout=source.layout)
    else:
        step = max(1, len(source) // sample)
        picked = ImageSource(items=source.items[::step][:sample], kind=source.kind, origin=source.origin)
    # Its notes are dropped: these images were just loaded, and what they warned about said then.
    images, names, _ = read_images(picked, ImageSpec(size=spec.size, channels=3), notes=ImageNotes())
    # Mean spread between an image's channels: 0 for gray stored as RGB, a few levels for JPEG noise.
    spread = (images.max(axis=1) - images.min(axis=1)).mean(axis=(1, 2))
    colour = int((spread > COLOUR_SPREAD).sum())
    if colour:
        log.warning("%s: %d of %d images checked are in colour, e.g. %s, but --channels 1 trains on grayscale, so "
                    "defects that differ only in colour will score as normal; pass --channels 3 to keep colour",
                    job.data, colour, len(names), names[int(np.argmax(spread > COLOUR_SPREAD))])


def _warn_duplicates(job: ImageTrainJob, source: ImageSource) -> None:
    # A file listed twice can land in both the training and the calibration images; its
    # calibration score is then that of a trained-on image, and the threshold comes out too low.
    # Links resolved: a folder assembled from links may hold two links to one file, or a link and its file.
    if source.kind == "npy":
        return  # rows of one array are never the same item
    listed: dict[str, list[str]] = {}
    for item in source.items:
        listed.setdefault(os.path.realpath(item), []).append(item)
    repeated = [names for names in listed.values() if len(names) > 1]
    if repeated:
        example = " and ".join(list(dict.fromkeys(repeated[0]))[:2])  # a link and its file: both names
        log.warning("%s: %d image(s) listed more than once, e.g. %s; a copy in both the training and the calibration "
                    "images makes the threshold too low: list each image once", job.data, len(repeated), example)


def split(job: ImageTrainJob, run: RunDir) -> dict:
    """Random train / validation / calibration images."""
    splits = split_rows(None, len(load_run_images(run)), job.config.calibration, job.config.training, str(job.data))
    np.savez(run.splits, **vars(splits))
    return splits.sizes()


def _build(job: ImageTrainJob):
    return lambda: ConvVAE(job.channels, job.image_size, job.config.model.latent_dim or DEFAULT_LATENT)


def train_model(job: ImageTrainJob, run: RunDir) -> dict:
    """Train the convolutional VAE with early stopping on the validation images."""
    images, splits = load_run_images(run), load_splits(run)
    result = train_vae(np.asarray(images[splits.train]), np.asarray(images[splits.val]), job.config.model,
                       job.config.training, build=_build(job))
    torch.save({"config": result.model.config(), "state_dict": result.model.state_dict()}, run.model)
    facts = {"epochs": len(result.history), "best_epoch": result.best_epoch, "seconds": round(result.seconds, 3),
             "seconds_per_epoch": round(result.seconds / max(len(result.history), 1), 3),
             "device": result.device, "mixed_precision": result.mixed_precision,
             "best_val_loss": result.history[result.best_epoch - 1]["val_loss"]}
    write_json(run.history, {"facts": facts, "epochs": result.history})
    return facts


def load_image_graph(job: ImageTrainJob, run: RunDir, calibration: Calibration | None = None) -> ImageScorerGraph:
    model = _build(job)()
    model.load_state_dict(torch.load(run.model, weights_only=True)["state_dict"])
    return ImageScorerGraph(model.eval(), job.config.model.kl_weight, calibration).eval()


def calibrate_threshold(job: ImageTrainJob, run: RunDir) -> dict:
    """Export the scorer, score the calibration images with it in onnxruntime and set the threshold
    at the target FPR."""
    splits = load_splits(run)
    target_fpr = job.config.calibration.target_fpr
    # On the scores of the graph that decides, as for tables (pipeline.workflow.calibrate_threshold).
    export_image_scorer(load_image_graph(job, run, placeholder_calibration(len(splits.cal), target_fpr)), run.scorer)
    feeds = {IMAGE_INPUT: np.ascontiguousarray(load_run_images(run)[splits.cal])}
    scores = score_in_chunks(create_session(run.scorer, "cpu", job.config.training.threads), feeds, IMAGE_CHUNK,
                             ["score"])["score"]
    calibration = calibrate(scores, target_fpr)
    write_json(run.calibration, {"calibration": calibration.to_dict(), "metrics": {}})
    return {"threshold": calibration.threshold, "n_calibration": calibration.n, "rank": calibration.rank,
            "expected_fpr": calibration.expected_fpr}


def _calibration(run: RunDir) -> Calibration:
    return Calibration.from_dict(read_json(run.calibration)["calibration"])


def export_bundle(job: ImageTrainJob, run: RunDir) -> dict:
    """Write the three ONNX graphs and the manifest into the staging folder."""
    calibration = _calibration(run)
    graph = load_image_graph(job, run, calibration)
    run.bundle.mkdir(exist_ok=True)
    export_image_encoder_decoder(graph.vae, run.bundle)
    write_calibrated_scorer(run.scorer, calibration, run.bundle / "scorer.onnx")
    spec = _spec(job)
    created = datetime.now(timezone.utc)
    version = created.strftime("%Y%m%dT%H%M%SZ")
    facts = {"vaeguard.bundle": job.name, "vaeguard.version": version, "vaeguard.modality": "image",
             "vaeguard.created_at": created.isoformat(), "vaeguard.threshold": repr(calibration.threshold),
             "vaeguard.target_fpr": repr(calibration.target_fpr), "vaeguard.n_calibration": str(calibration.n),
             "vaeguard.image": json.dumps(spec.to_dict()),
             "vaeguard.score": "score = recon + kl_weight * kl; recon = 0.5 * sum(((x - x_hat) / sigma)^2); z = mu"}
    for name in MODEL_FILES:
        set_metadata(run.bundle / name, facts)
    # The scorer's input for the calibration images, for recalibrating reduced-precision variants.
    np.save(run.bundle / CALIBRATION_IMAGES, np.ascontiguousarray(load_run_images(run)[load_splits(run).cal]))
    loaded = read_json(run.root / "images.json")
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "modality": "image",
        "name": job.name, "version": version, "created_at": created.isoformat(),
        "source": {"data": str(job.data), "images": len(loaded["names"]), "skipped": len(loaded["skipped"])},
        "image": spec.to_dict(),
        "model": {**graph.vae.config(), "beta": job.config.model.beta},
        "score": {
            "kl_weight": job.config.model.kl_weight,
            "definition": "score = recon + kl_weight * kl, with z = mu (no sampling)",
            "recon": "0.5 * sum over pixels and channels of ((x - x_hat) / sigma)^2, sigma the decoder's learned "
                     "per-pixel scale (Gaussian negative log-likelihood, row-independent terms dropped)",
            "kl": "0.5 * sum over latent dims of (mu^2 + exp(logvar) - 1 - logvar)",
            "anomaly_map": "recon's per-pixel terms summed over channels, [batch_size, size, size]",
        },
        "training": read_json(run.history)["facts"],
        "calibration": calibration.to_dict(),
        "metrics": {},
        "config": job.config.to_dict(),
        "onnx": {"opset": OPSET, "ir_version": IR_VERSION, "batch_axis": "batch_size",
                 "scorer_inputs": [{"name": IMAGE_INPUT, "dtype": "float32",
                                    "shape": ["batch_size", spec.channels, spec.size, spec.size]}],
                 "scorer_outputs": list(IMAGE_OUTPUT_NAMES), **cuda_settings()},
    }
    write_new_manifest(run.bundle, manifest)
    return {"bundle_version": version, "files": list(MODEL_FILES)}


def verify_bundle(job: ImageTrainJob, run: RunDir) -> dict:
    """Check the ONNX files, their parity with PyTorch and the scorer's decisions on the calibration images."""
    splits = load_splits(run)
    report = verify_image_export(run.bundle, load_image_graph(job, run, _calibration(run)),
                                 np.ascontiguousarray(load_run_images(run)[splits.cal]))
    return record_verification(run, report)


STEPS = (load_images, split, train_model, calibrate_threshold, export_bundle, verify_bundle, write_training_report)


def run_image_training(job: ImageTrainJob) -> dict:
    return run_steps(job, STEPS)
