"""Reduced-precision scorers: scorer.fp16.onnx (for GPUs) and scorer.int8.onnx (for CPUs).

`vaeguard export BUNDLE --precision fp16|int8` converts the bundle's fp32 scorer.onnx (the graph
passes are in pipeline.precision_graphs), then gives the variant its own threshold and calibration
table: the variant scores the calibration inputs the bundle keeps (calibration_rows.parquet or
calibration_images.npy), those scores are calibrated at the bundle's target FPR exactly as in
training, and the new table replaces the baked one. A threshold carried over from fp32 would
not hold: rounding moves every score, and the conformal guarantee is about the scores of the
graph that decides.

What runs in reduced precision is the VAE only (the nodes the exporter scopes /encoder/ and
/decoder/). Preprocessing, the string one-hot front, the score sum, the binary search over the
calibration table and the threshold comparison stay float32 in every variant, and the table's
initializers stay float32 tensors.

Before the manifest changes, the finished variant must pass two checks on the calibration
inputs, or the export fails:
- consistency: it flags exactly the calibration scores above its own threshold (the conformal
  count), with p-values equal to the table's;
- batch independence: each input scored alone scores as it does in a whole batch, up to float
  rounding (BATCH_TOLERANCE). A score that moves with the other rows of its batch breaks the
  promise that a row gets the same score on every run, at any batch size, and it breaks the
  calibration too: the threshold was set on batches of normal rows (int8 with onnxruntime's
  per-batch activation ranges had a 4x false-alarm rate on batches holding extreme rows).
The variant is built in a temporary file inside the bundle and moved into place, then the
manifest is replaced, so a failed export leaves the bundle as it was. Ctrl-C or SIGTERM during
those last few file operations is held until they are done (``signals_held``).
"""

from __future__ import annotations

import contextlib
import copy
import errno
import os
import platform
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import onnx
import pandas as pd
from onnx import helper

from pipeline.bundle import (CALIBRATION_IMAGES, CALIBRATION_ROWS, VARIANT_FILES, Bundle, bundle_lock,
                             sha256_file, write_manifest)
from pipeline.calibrate import Calibration, calibrate, conformal_p_values
from pipeline.config import check_threads
from pipeline.contract import IMAGE_INPUT, IR_VERSION
from pipeline.errors import BundleError, ConfigError, ExportError
from pipeline.inspect import agreeing, rounding_note
from pipeline.precision_graphs import CONVERTERS, find_table, write_table
from pipeline.runtime import CUDA, check_scorer_agrees, create_session, frame_feeds
from pipeline.signals import signals_held

TOOLS = {"fp16": "onnxruntime.transformers.float16",
         "int8": "onnxruntime.quantization.quantize_dynamic weights, per-row activations "
                 "(pipeline.precision_graphs)"}
SCORE_OUTPUTS = ["score", "p_value", "is_anomaly"]
TABLE_CHUNK = 65_536  # rows per run when scoring calibration rows: vaeguard score's default batch
IMAGE_CHUNK = 256  # images per run (pipeline.image_score's batch)
SPEED_ROWS = 65_536
SPEED_IMAGES = 1_024
REPEATS = 5
# Largest change of a calibration score, alone against in its batch, relative to the score (or
# to the threshold, for scores below it). Float rounding only: kernels pick their summation order
# and vector paths by batch size, and the score's division by learned scales (down to e^-5)
# amplifies that; fp32 scorer.onnx itself moves by up to 1.7e-6 on the demo bundle.
# A per-batch quantization range moves scores by 1e-3 and more.
BATCH_TOLERANCE = 1e-5
# Below this, `vaeguard export` and `vaeguard score` warn (the manifest keeps the warning).
MIN_AGREEMENT = 0.99
# How far scorer.onnx's scores may stray from PyTorch's, relative (pipeline.verify.RTOL, which
# imports torch): a change of that size is float rounding, not a model's difference. A row that
# close to fp32's threshold is decided by rounding: any other graph (PyTorch, a variant, another
# machine's kernels) may put it on the other side.
FP32_ROUNDING = 1e-4
# Why a file cannot be written into the bundle folder: its permissions, a read-only mount, a full disk.
CANNOT_WRITE = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT}


# --- calibration inputs --------------------------------------------------------------------


def is_image(bundle: Bundle) -> bool:
    return bundle.manifest.get("modality", "table") == "image"


def calibration_feeds(bundle: Bundle) -> dict[str, np.ndarray]:
    """The scorer's inputs for the bundle's calibration rows (or images)."""
    name = CALIBRATION_IMAGES if is_image(bundle) else CALIBRATION_ROWS
    if name not in bundle.manifest["files"]:
        raise BundleError(f"{bundle.path}: no {name} (bundles trained before reduced-precision export do not keep "
                          f"their calibration inputs); retrain with `vaeguard train` to add variants")
    with bundle.open_checked(name) as handle:  # the inputs of this bundle, not of one swapped in since
        if is_image(bundle):
            return {IMAGE_INPUT: np.ascontiguousarray(np.load(handle), dtype=np.float32)}
        rows = pd.read_parquet(handle)
    return frame_feeds(bundle.schema, rows, str(bundle.path / name))


def rows_of(feeds: dict[str, np.ndarray]) -> int:
    return len(next(iter(feeds.values())))


def take(feeds: dict[str, np.ndarray], index) -> dict[str, np.ndarray]:
    return {name: np.ascontiguousarray(values[index]) for name, values in feeds.items()}


def tiled(feeds: dict[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
    """The inputs repeated up to ``rows`` rows, for throughput measurements."""
    return take(feeds, np.arange(rows) % rows_of(feeds))


def score_in_chunks(session, feeds: dict[str, np.ndarray], chunk: int, outputs=SCORE_OUTPUTS) -> dict[str, np.ndarray]:
    """Score in chunks of ``chunk`` rows, as batch scoring does."""
    parts = [session.run(list(outputs), take(feeds, slice(i, i + chunk))) for i in range(0, rows_of(feeds), chunk)]
    return {name: np.concatenate([p[j] for p in parts]) for j, name in enumerate(outputs)}


# --- checks ------------------------------------------------------------------------------


def check_consistency(outputs: dict[str, np.ndarray], calibration: Calibration, precision: str,
                      outcome: str = "the bundle was left unchanged") -> dict:
    """The scorer, re-scoring its own calibration inputs, must give them exactly the scores its
    table holds, flag exactly those strictly above its threshold (rank - 1 of them where no other
    score ties the threshold) and give each the p-value of its rank among them, with the rule
    p_value <= target FPR. ``outcome`` says what a failure left (the export's or the training run's)."""
    score, p_value, flagged = outputs["score"], outputs["p_value"], outputs["is_anomaly"].astype(bool)
    expected = int(np.sum(calibration.scores > np.float32(calibration.threshold)))
    problems = []
    # The table is these very scores: each input's p-value is then that of its own rank among them.
    if not np.array_equal(np.sort(score), calibration.scores):
        problems.append("its scores of the calibration inputs are not the calibration table's")
    if not np.array_equal(flagged, score > np.float32(calibration.threshold)):
        problems.append("is_anomaly differs from score > threshold")
    if not np.array_equal(flagged, p_value <= np.float32(calibration.target_fpr)):
        problems.append("is_anomaly differs from p_value <= target FPR")
    if not np.array_equal(p_value, conformal_p_values(calibration.scores, score)):
        problems.append("p-values differ from the calibration table's")
    if int(flagged.sum()) != expected:
        problems.append(f"{int(flagged.sum())} calibration inputs flagged, the conformal count is {expected}")
    if problems:
        raise ExportError(f"the {precision} scorer is not consistent with its own calibration ({'; '.join(problems)}); "
                          f"{outcome}")
    return {"rows": len(score), "flagged": expected, "rate": expected / len(score), "passed": True}


def check_batch_independence(session, feeds: dict[str, np.ndarray], batched: np.ndarray, chunk: int,
                              threshold: float, precision: str) -> dict:
    """Every calibration input scored alone must score as it did in its batch of ``chunk``,
    up to float rounding: a variant whose scores depend on the batch fails the export."""
    alone = score_in_chunks(session, feeds, 1, ["score"])["score"].astype(np.float64)
    scale = np.maximum(np.abs(batched.astype(np.float64)), abs(threshold))
    change = np.abs(alone - batched) / scale
    worst = int(np.argmax(np.where(np.isnan(change), np.inf, change)))  # NaN counts as the worst
    if not change[worst] <= BATCH_TOLERANCE:
        raise ExportError(f"the {precision} scorer's scores depend on the batch: calibration input {worst} scores "
                          f"{alone[worst]:.7g} alone and {batched[worst]:.7g} in a batch of "
                          f"{min(chunk, rows_of(feeds)):,} ({change[worst]:.2e} relative, allowed "
                          f"{BATCH_TOLERANCE:.0e}); the bundle was left unchanged")
    return {"rows": len(alone), "batches": [1, min(chunk, rows_of(feeds))],
            "max_rel_score_change": float(change.max()), "tolerance": BATCH_TOLERANCE, "passed": True}


# --- measurements --------------------------------------------------------------------------


def score_errors(reference: dict[str, np.ndarray], variant: dict[str, np.ndarray], fp32_threshold: float) -> dict:
    error = np.abs(variant["score"].astype(np.float64) - reference["score"].astype(np.float64))
    relative = error / np.maximum(np.abs(reference["score"].astype(np.float64)), 1e-12)
    differ = variant["is_anomaly"] != reference["is_anomaly"]
    at_threshold = (np.abs(reference["score"].astype(np.float64) - fp32_threshold)
                    <= FP32_ROUNDING * abs(fp32_threshold))
    return {"decision_agreement": float(1 - np.mean(differ)),
            "decisions_differ": int(differ.sum()),
            # Of those, rows within rounding (FP32_ROUNDING) of fp32's threshold: not the variant's doing.
            "differ_at_fp32_threshold": int(np.sum(differ & at_threshold)),
            "max_abs_score_error": float(error.max()), "max_rel_score_error": float(relative.max()),
            "median_rel_score_error": float(np.median(relative))}


def throughput(sessions: dict[str, object], feeds: dict[str, np.ndarray], repeats: int = REPEATS) -> dict[str, float]:
    """Rows/s of each session on the same inputs, best of ``repeats``, interleaved so that a
    busy neighbour slows every session alike."""
    rows = rows_of(feeds)
    best = {name: float("inf") for name in sessions}
    for name, session in sessions.items():
        session.run(SCORE_OUTPUTS, feeds)  # warm-up: allocations, CUDA kernels
    for _ in range(repeats):
        for name, session in sessions.items():
            started = time.perf_counter()
            session.run(SCORE_OUTPUTS, feeds)
            best[name] = min(best[name], time.perf_counter() - started)
    return {name: rows / seconds for name, seconds in best.items()}


def device_name(device: str) -> str:
    if device == "cpu":
        with contextlib.suppress(OSError):
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
        return platform.processor() or platform.machine()
    return "CUDA GPU"


# --- the export ----------------------------------------------------------------------------


def cannot_write(directory: Path, name: str, exc: OSError, left: str) -> ExportError:
    return ExportError(f"{directory}: cannot write {name} into the bundle folder ({exc.strerror or exc}); "
                       f"`vaeguard export` adds the variant and rewrites manifest.json there: make the folder "
                       f"writable (or free disk space), or export a copy of the bundle; {left}")


def save_model(model: onnx.ModelProto, path: Path, props: dict[str, str]) -> None:
    helper.set_model_props(model, props)
    model.ir_version = IR_VERSION
    onnx.save(model, str(path))


def export_variant(bundle_path: str | Path, precision: str, device: str = "cpu", threads: int | None = None,
                   repeats: int = REPEATS) -> dict:
    """Add scorer.<precision>.onnx to a bundle with its own calibration; returns its manifest entry."""
    if precision not in VARIANT_FILES:
        raise ConfigError(f"--precision must be one of {', '.join(VARIANT_FILES)} for export, got {precision!r} "
                          f"(fp32 is scorer.onnx itself)")
    check_threads(threads)
    name = VARIANT_FILES[precision]
    bundle = Bundle.load(bundle_path, replacing=name)  # a deleted or damaged variant is made again
    directory = bundle.path
    image = is_image(bundle)
    chunk = IMAGE_CHUNK if image else TABLE_CHUNK
    # The fp32 scorer as load hash-checked it (a retrain may replace the file meanwhile), and a
    # manifest that `vaeguard score` would refuse is refused here, before a variant is built on it.
    reference_session = create_session(bundle.scorer_path, device, threads, contents=bundle.scorer_bytes())
    check_scorer_agrees(reference_session, bundle, "fp32")
    feeds = calibration_feeds(bundle)
    fp32_calibration = bundle.calibration
    fp32_model = onnx.load_from_string(bundle.scorer_bytes())
    find_table(fp32_model, fp32_calibration)
    tag = uuid.uuid4().hex[:8]
    draft, final = directory / f".{name}.draft-{tag}", directory / f".{name}.tmp-{tag}"
    committing = False
    try:
        with open(draft, "xb"):
            pass  # a folder the variant cannot be written into fails now, not after minutes of work
        variant = CONVERTERS[precision](fp32_model, directory)
        props = {p.key: p.value for p in fp32_model.metadata_props}
        save_model(variant, draft, props)
        try:
            session = create_session(draft, device, threads)
        except BundleError as exc:  # onnxruntime's own error, which create_session made one line
            raise ExportError(f"onnxruntime cannot run the {precision} scorer of {'an image' if image else 'a table'} "
                              f"bundle on this machine ({str(exc.__cause__).splitlines()[0][:200]}); keep using "
                              f"fp32") from exc
        # The table does not enter the score, so the draft scores as the final variant will.
        scores = score_in_chunks(session, feeds, chunk)["score"]
        if not np.all(np.isfinite(scores)):
            raise ExportError(f"the {precision} scorer gives non-finite scores on "
                              f"{int(np.sum(~np.isfinite(scores)))} calibration inputs (float16 overflow?); keep fp32")
        calibration = calibrate(scores, fp32_calibration.target_fpr)
        save_model(write_table(variant, calibration), final,
                   props | {"vaeguard.precision": precision, "vaeguard.threshold": repr(calibration.threshold),
                            "vaeguard.n_calibration": str(calibration.n), "vaeguard.tool": TOOLS[precision]})
        onnx.checker.check_model(str(final), full_check=True)
        session = create_session(final, device, threads)
        outputs = score_in_chunks(session, feeds, chunk)
        consistency = check_consistency(outputs, calibration, precision)
        batch_independence = check_batch_independence(session, feeds, outputs["score"], chunk,
                                                      calibration.threshold, precision)
        reference = score_in_chunks(reference_session, feeds, chunk)
        used = "cuda" if session.get_providers()[0] == CUDA else "cpu"
        speed_feeds = tiled(feeds, SPEED_IMAGES if image else SPEED_ROWS)
        rates = throughput({"fp32": reference_session, precision: session}, speed_feeds, repeats)
        entry = {
            "file": name, "precision": precision, "tool": TOOLS[precision],
            "created_at": datetime.now(timezone.utc).isoformat(),
            "threshold": calibration.threshold,
            "calibration": calibration.to_dict(),
            "reduced": "the VAE (encoder and decoder nodes); preprocessing, score sum, calibration table, "
                       "binary search and threshold comparison stay float32",
            "compared_on": f"{rows_of(feeds)} calibration {'images' if image else 'rows'}, against scorer.onnx",
            **score_errors(reference, outputs, fp32_calibration.threshold),
            "speed_ratio": rates[precision] / rates["fp32"],
            "fp32_rows_per_s": rates["fp32"], "variant_rows_per_s": rates[precision],
            "speed_batch": rows_of(speed_feeds), "speed_repeats": repeats,
            "device": used, "device_name": device_name(used),
            "threads": session.get_session_options().intra_op_num_threads,
            "batch_dependence": batch_independence,
            "consistency": consistency,
        }
        entry["warnings"] = variant_warnings(entry)
        with bundle_lock(directory):
            # The manifest as it is now, not as it was read: another export may have added its
            # variant meanwhile, and a retrain may have replaced the bundle.
            current = Bundle.load(directory, replacing=name)
            if (current.manifest["files"]["scorer.onnx"] != bundle.manifest["files"]["scorer.onnx"]
                    or current.manifest["calibration"] != bundle.manifest["calibration"]):
                raise ExportError(f"{directory}: bundle {bundle.name!r} was replaced while its {precision} scorer "
                                  f"was made (scorer.onnx changed); the bundle was left as it is: run the export again")
            manifest = copy.deepcopy(current.manifest)
            committing = True
            with signals_held():
                if name in manifest["files"]:
                    # Re-export: drop the old variant from the manifest first, so no moment leaves a
                    # manifest naming a file whose hash it does not match.
                    manifest["files"].pop(name)
                    manifest.get("variants", {}).pop(precision, None)
                    write_manifest(directory, manifest)
                os.replace(final, directory / name)
                manifest["files"][name] = sha256_file(directory / name)
                manifest.setdefault("variants", {})[precision] = entry
                write_manifest(directory, manifest)
        return entry
    except OSError as exc:
        if exc.errno not in CANNOT_WRITE:
            raise
        left = ("the bundle was left unchanged" if not committing else
                f"the bundle still loads, possibly without its {precision} scorer: run the export again")
        raise cannot_write(directory, name, exc, left) from exc
    finally:
        # On a read-only folder these fail too (EROFS, not a missing file): the error to report is
        # the one above, which says what to fix, not the cleanup's.
        for leftover in (draft, final):
            with contextlib.suppress(OSError):
                leftover.unlink(missing_ok=True)


def variant_warnings(entry: dict) -> list[str]:
    """What a user of the variant must know: decisions that often differ from fp32's.

    A row within rounding of fp32's threshold does not count: with fewer than 100 calibration
    inputs that one row alone fell below MIN_AGREEMENT (4 of the 9 small bundles tried, when fp32
    was calibrated on PyTorch's scores and scorer.onnx rounded its threshold row up)."""
    rows = entry["calibration"]["n_calibration"]
    own = entry["decisions_differ"] - entry["differ_at_fp32_threshold"]
    if own > (1 - MIN_AGREEMENT) * rows:
        return [f"its decisions differ from fp32's on {own:,} of the {rows:,} calibration inputs "
                f"({own / rows:.2%}, more than {1 - MIN_AGREEMENT:.0%})"]
    return []


def describe_variant(entry: dict) -> str:
    """A few lines for `vaeguard export`."""
    calibration, batch = entry["calibration"], entry["batch_dependence"]
    return "\n".join([
        f"file:        {entry['file']} ({entry['tool']})",
        f"threshold:   {entry['threshold']:.6g} (own calibration: expected FPR {calibration['expected_fpr']:.4%} "
        f"from {calibration['n_calibration']:,} inputs)",
        f"agreement:   decisions agree with fp32 on {agreeing(entry):,} of the {calibration['n_calibration']:,} "
        f"calibration inputs{rounding_note(entry)}",
        f"score error: max abs {entry['max_abs_score_error']:.3g}, max rel {entry['max_rel_score_error']:.2%}, "
        f"median rel {entry['median_rel_score_error']:.3%}",
        f"speed:       {entry['speed_ratio']:.2f}x fp32 ({entry['variant_rows_per_s']:,.0f} vs "
        f"{entry['fp32_rows_per_s']:,.0f} rows/s, {entry['device']}, {entry['threads']} threads)",
        f"batch:       each of the {batch['rows']:,} inputs scores alike alone and in a batch of "
        f"{batch['batches'][-1]:,} (max rel change {batch['max_rel_score_change']:.1e}, "
        f"allowed {batch['tolerance']:.0e})",
        f"device:      checked on {entry['device']}: `vaeguard score --precision {entry['precision']}` uses it "
        f"there only",
    ])
