"""Batch scoring of image folders (or CSVs of paths, or .npy arrays) with an image bundle.

Images are read and preprocessed in bounded batches exactly as the manifest says. An
unreadable image is skipped, recorded with its reason in ``<output>.errors.csv`` and counted
in the summary; the batch goes on. With ``maps_dir`` every flagged image also gets a PNG:
the image, its reconstruction and a heat map of the per-pixel error. Maps are written into a
hidden staging folder inside ``maps_dir`` and moved into it in the commit of the run's scores.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
from tqdm.auto import tqdm

from pipeline.anomaly_maps import map_name, write_map
from pipeline.batch_score import FileSummary, ScoreSummary
from pipeline.bundle import Bundle
from pipeline.calibrate import stored_fpr_range
from pipeline.config import ScoreJob, show_progress
from pipeline.contract import IMAGE_INPUT, IMAGE_OUTPUT_NAMES, OUTPUT_NAMES
from pipeline.errors import ConfigError, DataError
from pipeline.images import ImageNotes, ImageSpec, iter_image_batches, list_images, searched_by, text_path, write_errors
from pipeline.outputs import (OutputWriter, StagedOutputs, check_location, check_outside_bundle, check_scores_target,
                              figures_dir, missing_parents, remove_empty_folders, report_path, same_file,
                              stage_report_removal, summary_path)
from pipeline.runtime import check_scorer_agrees, check_variant_device, create_session, variant_device
from pipeline.signals import raise_deferred, signals_deferred

# Images are far larger than table rows: a batch of 256 64x64 RGB images is 12 MB.
MAX_IMAGE_BATCH = 256


def errors_path(output: Path) -> Path:
    return output.with_name(output.stem + ".errors.csv")


def score_images(job: ScoreJob) -> ScoreSummary:
    if job.batch_size < 1:
        raise ConfigError(f"--batch-size must be a positive number of images, got {job.batch_size}")
    # Before any work: the output, its summary, its errors file and the maps folder must not be
    # inputs (the errors file of an earlier run is deleted by name, an input with it), and the
    # maps folder must be able to become a folder.
    check_scores_target(job.output, job.inputs, job.bundle)
    check_side_files(job)
    if job.maps_dir is not None:
        check_outside_bundle(job.maps_dir, job.bundle, "--maps")
    staged = StagedOutputs()
    stage_report_removal(staged, job.output)
    writer = OutputWriter(job.output, into=staged)
    bundle = Bundle.load(job.bundle)
    spec = ImageSpec.from_dict(bundle.manifest["image"])
    sources = [(Path(p), list_images(Path(p))) for p in job.inputs]  # empty folders fail before any work
    session = create_session(bundle.scorer_path_for(job.precision), variant_device(bundle, job.precision, job.device),
                             job.threads, contents=bundle.scorer_bytes(job.precision))
    calibration = bundle.calibration_for(job.precision)
    threshold = calibration["threshold"]
    summary = ScoreSummary(bundle=str(bundle.path), output=str(job.output),
                           device="cuda" if session.get_providers()[0] == "CUDAExecutionProvider" else "cpu",
                           target_fpr=calibration["target_fpr"], expected_fpr=calibration["expected_fpr"],
                           fpr_range=stored_fpr_range(calibration))
    check_variant_device(bundle, job.precision, summary.device)
    check_scorer_agrees(session, bundle, job.precision)
    errors: list[tuple[str, str]] = []
    # A failed run must not leave maps of the images scored before it failed: they go to a hidden
    # folder inside the maps folder, and each moves into place in the commit of the scores.
    maps_dir = None if job.maps_dir is None else Path(job.maps_dir)
    staging = None if maps_dir is None else staging_folder(maps_dir)
    new_folders = [] if staging is None else missing_parents(staging)  # made by the first map, if any
    mapped: set[str] = set()
    started = time.perf_counter()
    progress = tqdm(unit="img", desc="scoring", disable=not show_progress(), leave=False)
    try:
        # The maps, the scores, their errors file and summary become real together, or the earlier ones
        # stay as they were (StagedOutputs). Ctrl-C and SIGTERM stop the run between two batches, never
        # inside onnxruntime or Pillow (pipeline.signals).
        with staged, signals_deferred():
            with progress, writer:
                for path, source in sources:
                    file_summary = FileSummary(str(path), target_fpr=summary.target_fpr)
                    file_started = time.perf_counter()
                    notes = ImageNotes()  # warnings about images that were scored, said once per input
                    for images, names, bad in iter_image_batches(source, spec, min(job.batch_size, MAX_IMAGE_BATCH),
                                                                 notes):
                        raise_deferred()
                        errors += bad
                        file_summary.skipped += len(bad)
                        if not names:
                            continue
                        outputs = dict(zip(IMAGE_OUTPUT_NAMES,
                                           session.run(list(IMAGE_OUTPUT_NAMES), {IMAGE_INPUT: images})))
                        # A file name that is not valid UTF-8 can't go into a table as it is; escaped, it can.
                        texts = [text_path(n) for n in names]
                        columns = {"path": pa.array(texts, pa.string())}
                        columns |= {n: pa.array(outputs[n]) for n in OUTPUT_NAMES}
                        if len(sources) > 1:  # as for tables, and as the scoring flow's merge writes it
                            columns = {"source": pa.array([text_path(str(path))] * len(names), pa.string())} | columns
                        writer.write(pa.table(columns))
                        if staging is not None:
                            for i in np.flatnonzero(outputs["is_anomaly"]):
                                name = map_name(texts[i])
                                # One colour scale for every map: the threshold's share per pixel.
                                write_map(staging / name, images[i], outputs["reconstruction"][i],
                                          outputs["anomaly_map"][i], vmax=_map_scale(threshold, spec))
                                if name not in mapped:  # an image listed twice is drawn twice, moved in once
                                    mapped.add(name)
                                    staged.add(staging / name, maps_dir / name)
                        file_summary.rows += len(names)
                        file_summary.anomalies += int(outputs["is_anomaly"].sum())
                        progress.update(len(names))
                    notes.log(text_path(str(path)))
                    file_summary.seconds = time.perf_counter() - file_started
                    summary.files.append(file_summary)
                    summary.rows += file_summary.rows
                    summary.anomalies += file_summary.anomalies
                if summary.rows == 0:
                    # No errors file is written for a run that fails, so the first reason goes in the message.
                    first = f" (first: {text_path(errors[0][0])}: {text_path(errors[0][1])})" if errors else ""
                    raise DataError(f"{', '.join(map(str, job.inputs))}: none of the {len(errors)} image file(s) could "
                                    f"be read{first}; expected PNG, JPEG or BMP images")
            summary.seconds = time.perf_counter() - started
            summary.skipped = len(errors)
            stage_errors(staged, errors, job.output)
            report = summary.to_dict() | {"errors_file": str(errors_path(job.output)) if errors else None}
            staged.text(summary_path(job.output), json.dumps(report, indent=2, allow_nan=False))
            raise_deferred()  # one that came before the commit stops the run with no output
            staged.commit()
    finally:
        if staging is not None:
            remove_staging_folder(staging, new_folders)
    return summary


def check_side_files(job: ScoreJob) -> None:
    """Refuse, before any work, an errors file or maps folder that is an input, a maps path that is a
    file, and PNGs (maps, report figures, the bundle's own) where scoring an input folder would take
    them for images."""
    output, maps_dir = job.output, job.maps_dir
    pictures = [] if maps_dir is None else [("--maps", Path(maps_dir))]
    if job.report:
        pictures.append(("--report", figures_dir(report_path(output))))
    for source in map(Path, job.inputs):
        # Listed with the folder, the bundle's report figures would be scored (and flagged) as images.
        if searched_by(source, job.bundle):
            raise ConfigError(f"{source}: holds the bundle {job.bundle}, whose report figures would be scored as "
                              f"images; move the bundle out of {source}, or score a subfolder without it")
        if same_file(errors_path(output), source):
            raise ConfigError(f"--output {output}: its errors file {errors_path(output)} is the input {source}, "
                              f"which would be deleted or replaced; choose another output name")
        if maps_dir is not None and same_file(Path(maps_dir), source):
            raise ConfigError(f"--maps {maps_dir}: is the input {source}, into which the maps would be written; "
                              f"write the maps to another folder")
        for option, folder in pictures:
            # Listed there, last night's maps were scored (and flagged) as images tonight, and mapped again.
            if searched_by(source, folder):
                raise ConfigError(f"{option}: its PNGs would go to {folder}, inside the input folder {source}, whose "
                                  f"next scoring would take them for images; write them outside that folder")
    if maps_dir is None:
        return
    maps_dir = Path(maps_dir)
    if maps_dir.is_symlink() and not maps_dir.exists():
        # Else found only as the first map is drawn, after scoring the images before it.
        raise ConfigError(f"--maps {maps_dir}: is a link to {os.readlink(maps_dir)}, which does not exist; "
                          f"create that folder, or give another path")
    check_location(maps_dir, "--maps", "directory")


def staging_folder(maps_dir: Path) -> Path:
    """A hidden folder inside ``maps_dir`` (made by the first map; by the scoring flow before its tasks,
    which draw into a subfolder each), so that moving a map into place stays on one file system, in a
    folder this run could write into already: from beside a maps folder that links to another disk it
    failed, after the scores were in place. Maps of earlier runs stay in ``maps_dir``; this run's
    replace those of the same images."""
    return maps_dir / f".{maps_dir.name}.tmp-{uuid.uuid4().hex[:8]}"


def remove_staging_folder(staging: Path, new_folders: list[Path]) -> None:
    """The end of a run with maps, committed or not: ``staging`` goes (empty once committed; the maps
    of a failed run), and the folders made for it (``missing_parents``) while empty: a maps folder
    with maps in it stays."""
    shutil.rmtree(staging, ignore_errors=True)
    remove_empty_folders(new_folders)


def stage_drawn_maps(staged: StagedOutputs, folders: list[Path], maps_dir: Path) -> None:
    """The maps drawn into ``folders`` (one per input, in input order: the scoring flow's tasks) move
    into ``maps_dir`` in ``staged``'s commit. Where two inputs list one image, a later input's map of
    that name replaces an earlier one's, as in a plain run, which draws it twice and moves it in once."""
    latest: dict[str, Path] = {}
    for folder in folders:
        if folder.is_dir():  # none when nothing in that input was flagged
            for png in sorted(folder.glob("*.png")):  # what its task committed: no temporary file is left
                latest[png.name] = png
    for name, png in latest.items():
        staged.add(png, maps_dir / name)


def _map_scale(threshold: float, spec: ImageSpec) -> float:
    """A pixel at the average share of a threshold-level image's error shows mid-bright."""
    return max(2.0 * threshold / (spec.size * spec.size), 1e-6)


def stage_errors(staged: StagedOutputs, errors: list[tuple[str, str]], output: Path) -> None:
    """The run's unreadable images, in ``output``'s errors file when it commits; with none, an
    earlier run's errors file goes then: beside this run's scores it would mislead."""
    if errors:
        write_errors(errors, staged.temp_for(errors_path(output)))
    else:
        staged.remove(errors_path(output))


def read_error_files(parts: list[Path]) -> list[tuple[str, str]]:
    """The unreadable images in the errors files of per-input parts, in the parts' order."""
    errors = []
    for part in parts:
        path = errors_path(part)
        if path.exists():
            with open(path, newline="", encoding="utf-8") as handle:
                errors += [tuple(row) for row in list(csv.reader(handle))[1:]]
    return errors
