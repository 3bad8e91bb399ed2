"""One entry point for scoring, whatever the bundle scores: tables or images."""

from __future__ import annotations

from pipeline.batch_score import ScoreSummary, score_files
from pipeline.bundle import Bundle
from pipeline.config import ScoreJob
from pipeline.image_score import score_images


def score(job: ScoreJob) -> ScoreSummary:
    if job.report:
        from pipeline.scoring_report import check_report_target  # matplotlib only when a report is asked for

        check_report_target(job.output)
    if Bundle.load(job.bundle).manifest.get("modality", "table") == "image":
        return score_images(job)
    return score_files(job)
