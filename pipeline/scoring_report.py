"""The scoring report (`vaeguard score ... --report`): <output stem>.report.html next to the scores.

How this batch's scores compare with the calibration scores, the anomaly rate against the
target, drift statistics, and the top anomalies with what drives them: for tables the columns
carrying their reconstruction error (from encoder.onnx and decoder.onnx, no torch needed), for
images the image, its reconstruction and the heat map.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from pipeline.bundle import Bundle
from pipeline.calibrate import Calibration
from pipeline.config import ScoreJob
from pipeline.contract import IMAGE_INPUT, IMAGE_OUTPUT_NAMES
from pipeline.drift import drift_report
from pipeline.errors import InputFileError
from pipeline.images import ImageNotes, ImageSource, ImageSpec, list_images, load_images, text_path
from pipeline.outputs import output_format, report_path, summary_path
from pipeline.plots import feature_contributions, image_grid, score_histogram
from pipeline.preprocess import Preprocessor
from pipeline.report_html import Section, check_report_location, facts_table, write_report
from pipeline.schema import as_category_array
from pipeline.tables import iter_batches

TOP_ANOMALIES = 20


def check_report_target(output: Path) -> None:
    """Before scoring: the report written after it must be able to go beside ``output``."""
    check_report_location(report_path(output))


def read_scores(output: Path) -> pd.DataFrame:
    table = pq.read_table(output) if output_format(output) == "parquet" else pacsv.read_csv(output)
    return table.to_pandas()


def write_scoring_report(job: ScoreJob) -> Path:
    return write_report(report_path(job.output), f"vaeguard scoring report: {job.output.name}", scoring_sections(job))


def scorer_calibration(bundle: Bundle, precision: str) -> Calibration:
    """The calibration of the scorer that scored: each precision variant has its own."""
    return Calibration.from_dict(bundle.calibration_for(precision))


def input_warnings(output: Path) -> list[str]:
    """The run's warnings on categorical values the bundle never saw and on numeric columns blank far
    more often than in training, from its summary (written before the report): they say why a night's
    scores rose, or why they look calmer than they are, which the drift figures only show."""
    try:
        summary = json.loads(summary_path(output).read_text())
    except FileNotFoundError:  # scores written by an older version, without a summary beside them
        return []
    return [entry["warning"] for field in ("unseen_categories", "missing_numeric")
            for entry in summary.get(field, {}).values() if entry["warning"]]


def scorer_name(bundle: Bundle, precision: str) -> str:
    return f"{precision} ({bundle.scorer_path_for(precision).name})"


def scoring_sections(job: ScoreJob) -> list[Section]:
    bundle = Bundle.load(job.bundle)
    calibration = scorer_calibration(bundle, job.precision)
    scored = read_scores(job.output)
    scores = scored["score"].to_numpy(dtype=np.float32)
    anomalies = int(scored["is_anomaly"].sum())
    drift = drift_report(scores, anomalies, calibration.scores, calibration.expected_fpr)
    rate = {"scored by": scorer_name(bundle, job.precision), "threshold": _fmt(calibration.threshold),
            "rows": f"{len(scored):,}", "anomalies": f"{anomalies:,}",
            "observed rate": f"{anomalies / max(len(scored), 1):.3%}", "target FPR": f"{calibration.target_fpr:.3%}",
            "expected FPR on normal data": f"{calibration.expected_fpr:.3%}",
            "p-value of the rate (given the calibration sample)": _fmt(drift.calibrated_p_value),
            "plain binomial p-value": _fmt(drift.rate_p_value)}
    sections = [
        Section("Scores against calibration", "This batch's scores over the calibration scores; the red line is "
                "the threshold.", figures=[("scores against calibration", score_histogram(
                    calibration.scores, calibration.threshold, calibration.target_fpr, scored=scores))]),
        Section("Anomaly rate", tables=[("Flagged rows against the target false-positive rate", facts_table(rate))]),
        Section("Drift", "Population stability index (PSI) and Kolmogorov-Smirnov statistic of the scores "
                "against the calibration scores; PSI above 0.25 usually means the data changed, and alerts where "
                "so high a PSI is also unlikely with no drift (p below 0.001: on few rows it often is not)."
                + "".join(f"\n\n{note}" for note in drift.not_judged),
                alert="\n".join([*drift.alerts, *input_warnings(job.output)]),
                tables=[("", facts_table({"PSI": _fmt(drift.psi), "PSI p-value with no drift": _fmt(drift.psi_p_value),
                                          "KS statistic": _fmt(drift.ks_statistic),
                                          "KS p-value": _fmt(drift.ks_p_value)}))]),
    ]
    top = np.argsort(-scores, kind="stable")[:TOP_ANOMALIES]
    if bundle.manifest.get("modality") == "image":
        sections.append(_top_images(bundle, job, scored.iloc[top]))
    else:
        sections.append(_top_rows(bundle, job, scored, top))
    return sections


def _fmt(value: float | None) -> str:
    return "-" if value is None or not np.isfinite(value) else f"{value:.4g}"


def _rows_at(job: ScoreJob, bundle: Bundle, positions: np.ndarray) -> pd.DataFrame:
    """Re-read just the rows at these output positions (output order = input order)."""
    schema, wanted, found, offset = bundle.schema, set(positions.tolist()), [], 0
    for path in job.inputs:
        for batch in iter_batches(path, list(schema.numeric), list(schema.categorical), list(schema.id_columns),
                                  job.batch_size):
            hits = [i - offset for i in range(offset, offset + batch.num_rows) if i in wanted]
            if hits:
                found.append(batch.take(hits).to_pandas().set_axis([offset + h for h in hits]))
            offset += batch.num_rows
    return pd.concat(found).loc[positions]


def _top_rows(bundle: Bundle, job: ScoreJob, scored: pd.DataFrame, top: np.ndarray) -> Section:
    rows = _rows_at(job, bundle, top)
    pre = bundle.preprocessor
    numeric = rows[list(pre.numeric_columns)].to_numpy(dtype=np.float32, na_value=np.nan)
    categories = [as_category_array(pa.array(rows[c], from_pandas=True)) for c in pre.categorical_columns]
    # A value far out (1e30, say) overflows float32 here as in the scorer, which publishes +inf
    # for it: no warning, and its row's error is all in the columns that overflowed.
    with np.errstate(over="ignore", invalid="ignore"):
        features = pre.transform(numeric, categories)
        options = ["CPUExecutionProvider"]
        mu, _ = ort.InferenceSession(str(bundle.path / "encoder.onnx"), providers=options).run(None, {"features": features})
        (rebuilt,) = ort.InferenceSession(str(bundle.path / "decoder.onnx"), providers=options).run(None, {"z": mu})
        scale = np.exp(np.asarray(bundle.manifest["model"]["decoder_log_scale"], dtype=np.float32))
        errors = 0.5 * ((features.astype(np.float64) - rebuilt) / scale) ** 2
    # The input columns that overflowed when scaled, if any did (they make every error of the row
    # inf or NaN), else the errors that did.
    overflowed = ~np.isfinite(features)
    overflowed = np.where(overflowed.any(axis=1, keepdims=True), overflowed, ~np.isfinite(errors))
    errors = np.where(overflowed.any(axis=1, keepdims=True), overflowed.astype(np.float64), errors)
    share = column_shares(errors, pre)
    table = top_rows_table(rows, scored["score"].to_numpy()[top], share)
    return Section("Top anomalies", f"The {len(top)} highest-scoring rows and the columns that carry their "
                   f"reconstruction error.",
                   figures=[("feature contributions", feature_contributions(share.to_numpy(), list(share.columns)))],
                   tables=[("Top anomalies with their values", table.head(10))])


def column_shares(errors: np.ndarray, pre: Preprocessor) -> pd.DataFrame:
    """Each row's reconstruction error as shares per input column (one-hot and missing flags summed
    into their column), the columns in the schema's order."""
    per_column = pd.DataFrame(np.asarray(errors).T).groupby(pre.feature_columns, sort=False).sum().T
    return per_column.div(per_column.sum(axis=1).replace(0, 1), axis=0)


def top_rows_table(rows: pd.DataFrame, scores: np.ndarray, share: pd.DataFrame) -> pd.DataFrame:
    """The top rows' values beside their score and main driver, under two headers: vaeguard's columns
    and the data's. A data column may be named 'score' or 'main driver' (or anything the report
    adds), which one flat header could not hold twice (pandas: "cannot insert score, already exists")."""
    own = pd.DataFrame({"score": scores, "main driver": share.idxmax(axis=1).to_numpy()})
    return pd.concat({"vaeguard": own, "data": rows.reset_index(drop=True)}, axis=1)


def _top_images(bundle: Bundle, job: ScoreJob, top: pd.DataFrame) -> Section:
    spec = ImageSpec.from_dict(bundle.manifest["image"])
    wanted = top["path"].head(8).tolist()
    where = _listed_items(job, set(wanted))
    images, names, unread = [], [], []
    for text in wanted:
        if text not in where:
            unread.append(f"{text}: no longer among the inputs")
            continue
        source, index = where[text]
        # Scoring warned about these images already: a throwaway ImageNotes keeps it to once.
        loaded, ok, bad = load_images(source, spec, index, index + 1, notes=ImageNotes())
        if ok:
            images.append(loaded[0])
            names.append(text)
        else:
            unread.append(f"{text}: {bad[0][1]}")
    title, text = "Most anomalous images", "The image, its reconstruction and where the error sits."
    if not images:
        # The scores are written and stand; a report that can't show the images says why instead of failing.
        return Section(title, f"None of the {len(wanted)} highest-scoring images could be read again for this "
                       f"report (first: {unread[0]}); their scores are in {job.output.name}.")
    stacked = np.stack(images)
    # The bytes the bundle's load hash-checked: the path may name a retrained bundle's scorer by now.
    session = ort.InferenceSession(bundle.scorer_bytes(job.precision), providers=["CPUExecutionProvider"])
    outputs = dict(zip(IMAGE_OUTPUT_NAMES, session.run(list(IMAGE_OUTPUT_NAMES), {IMAGE_INPUT: stacked})))
    titles = [f"{Path(n).name}: score {s:.4g}" for n, s in zip(names, outputs["score"])]
    if unread:
        text += f" {len(unread)} of them could not be read again (first: {unread[0]})."
    return Section(title, text, figures=[("top images", image_grid(stacked, outputs["reconstruction"],
                                                                     outputs["anomaly_map"], titles))])


def _listed_items(job: ScoreJob, texts: set[str]) -> dict[str, tuple[ImageSource, int]]:
    """Where each scored ``path`` sits among the job's listed inputs.

    The scores file holds ``text_path(item)`` (a file name that is not UTF-8 escaped), and an
    array's item can only be loaded through its whole source at its index, so the report lists
    the inputs again as scoring did rather than opening the written text as a path.
    """
    where = {}
    for path in job.inputs:
        try:
            source = list_images(Path(path))
        except InputFileError:  # moved or emptied since it was scored: its images are reported unread
            continue
        for index, item in enumerate(source.items):
            text = text_path(item)
            if text in texts:
                where.setdefault(text, (source, index))
    return where


def summary_markdown(job: ScoreJob) -> str:
    """The report's numbers as markdown, for the scoring flow's artifact."""
    bundle = Bundle.load(job.bundle)
    calibration = scorer_calibration(bundle, job.precision)
    scored = read_scores(job.output)
    anomalies = int(scored["is_anomaly"].sum())
    drift = drift_report(scored["score"].to_numpy(dtype=np.float32), anomalies, calibration.scores,
                         calibration.expected_fpr)
    lines = [f"# Scores of {job.output.name}", "", "| measure | value |", "|---|---|",
             f"| scored by | {scorer_name(bundle, job.precision)} |", f"| rows | {len(scored):,} |",
             f"| anomalies | {anomalies:,} |",
             f"| observed rate | {anomalies / max(len(scored), 1):.3%} |",
             f"| target FPR | {calibration.target_fpr:.3%} (expected {calibration.expected_fpr:.3%}) |",
             f"| rate p-value | {_fmt(drift.calibrated_p_value)} |", f"| score PSI | {_fmt(drift.psi)} |",
             f"| KS statistic | {_fmt(drift.ks_statistic)} |",
             f"| median score (calibration median) | {np.median(scored['score']):.4g} "
             f"({np.median(calibration.scores):.4g}) |"]
    alerts = [*drift.alerts, *input_warnings(job.output)]
    return "\n".join(lines + [f"\n{note}" for note in drift.not_judged] + [f"\n**Alert:** {alert}" for alert in alerts])
