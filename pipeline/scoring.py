"""One entry point for scoring, whatever the bundle scores: tables or images."""

from __future__ import annotations

from pipeline.batch_score import ScoreSummary, score_files
from pipeline.bundle import Bundle
from pipeline.config import ScoreJob
from pipeline.errors import ConfigError
from pipeline.image_score import score_images


def score(job: ScoreJob) -> ScoreSummary:
    if job.report:
        from pipeline.scoring_report import check_report_target  # matplotlib only when a report is asked for

        check_report_target(job.output)
    modality = Bundle.load(job.bundle).manifest.get("modality", "table")
    check_maps_wanted(job, modality)
    if modality == "image":
        return score_images(job)
    return score_files(job)


def check_maps_wanted(job: ScoreJob, modality: str) -> None:
    """Refuse --maps for a table bundle: it was ignored without a word, and the user looked for maps."""
    if job.maps_dir is not None and modality != "image":
        raise ConfigError(f"--maps {job.maps_dir}: bundle {job.bundle} scores tables, and maps are drawn for image "
                          f"bundles only; leave --maps out")
