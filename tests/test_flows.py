"""The Prefect flows, run for real against a temporary local server."""

import asyncio
import json
from pathlib import Path

import pandas as pd
import pytest

from flows.score import score_flow
from flows.train import train_flow
from pipeline.config import ScoreJob, TrainJob
from tests.conftest import quiet_config

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_harness")]


def read_artifact(key: str):
    from prefect.client.orchestration import get_client

    async def latest():
        async with get_client() as client:
            return await client.read_latest_artifacts()

    return next(a for a in asyncio.run(latest()) if a.key == key)


@pytest.fixture(scope="module")
def flow_bundle(tmp_path_factory, sensor_csv):
    out = tmp_path_factory.mktemp("flow-exported")
    facts = train_flow(TrainJob(data=sensor_csv, name="flowed", out_dir=out, label_column="label",
                                id_columns=("row_id",), config=quiet_config()))
    return facts


def test_train_flow_publishes_a_verified_bundle_and_a_summary(flow_bundle):
    bundle = flow_bundle["bundle"]
    manifest = json.loads(open(f"{bundle}/manifest.json").read())
    assert manifest["verification"]["passed"]
    assert flow_bundle["calibrate_threshold"]["auroc"] > 0.7
    artifact = read_artifact("vaeguard-training")
    assert "flowed" in artifact.data and f"{manifest['calibration']['threshold']:.6g}" in artifact.data
    link = read_artifact("vaeguard-training-report")
    assert (Path(bundle) / "report.html").resolve().as_uri() in link.data  # Prefect stores links as markdown


def test_score_flow_scores_each_file_into_one_output(flow_bundle, sensor_frame, incoming_csv, tmp_path):
    second = tmp_path / "second.parquet"
    sensor_frame.iloc[:500].to_parquet(second)
    output = tmp_path / "out" / "scores.parquet"
    summary = score_flow(ScoreJob(bundle=flow_bundle["bundle"], inputs=(incoming_csv, second), output=output))
    scored = pd.read_parquet(output)
    assert len(scored) == summary["rows"] == 2000 + 500
    assert scored["source"].value_counts().to_dict() == {str(incoming_csv): 2000, str(second): 500}
    assert summary["files"][0]["auroc"] > 0.7
    assert sorted(p.name for p in output.parent.iterdir()) == ["scores.parquet", "scores.summary.json"]
    table = read_artifact("vaeguard-scoring")
    assert str(incoming_csv) in table.data
    markdown = read_artifact("vaeguard-scoring-summary")
    assert f"| anomalies | {int(scored['is_anomaly'].sum()):,} |" in markdown.data and "score PSI" in markdown.data


def test_score_flow_refuses_an_output_that_is_an_input_before_scoring(flow_bundle, sensor_frame, tmp_path, monkeypatch):
    import flows.score
    from pipeline.errors import ConfigError

    first, second = tmp_path / "first.parquet", tmp_path / "second.parquet"
    sensor_frame.iloc[:300].to_parquet(first)
    sensor_frame.iloc[300:600].to_parquet(second)
    before = second.read_bytes()
    monkeypatch.setattr(flows.score, "score", lambda job: pytest.fail("scored before the output was checked"))
    with pytest.raises(ConfigError, match="is the input"):
        score_flow(ScoreJob(bundle=flow_bundle["bundle"], inputs=(first, second), output=second))
    assert second.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["first.parquet", "second.parquet"]




def test_score_flow_checks_the_report_and_bundle_folder_before_scoring(flow_bundle, sensor_frame, tmp_path,
                                                                     monkeypatch):
    import flows.score
    from pipeline.errors import ConfigError

    source = tmp_path / "in.parquet"
    sensor_frame.iloc[:300].to_parquet(source)
    monkeypatch.setattr(flows.score, "score", lambda job: pytest.fail("scored before the outputs were checked"))
    (tmp_path / "out" / "scores.report.html").mkdir(parents=True)  # a folder where the report would go
    with pytest.raises(ConfigError, match="report .*scores.report.html: is an existing directory"):
        score_flow(ScoreJob(bundle=flow_bundle["bundle"], inputs=(source,), output=tmp_path / "out" / "scores.parquet",
                            report=True))
    with pytest.raises(ConfigError, match="inside the bundle"):
        score_flow(ScoreJob(bundle=flow_bundle["bundle"], inputs=(source,),
                            output=Path(flow_bundle["bundle"]) / "scores.parquet"))


def test_a_failed_score_flow_leaves_no_folder_it_made(flow_bundle, sensor_frame, tmp_path):
    from pipeline.errors import DataError

    good, bad = tmp_path / "good.parquet", tmp_path / "bad.parquet"
    sensor_frame.iloc[:300].to_parquet(good)
    sensor_frame.iloc[:300].drop(columns=["temperature"]).to_parquet(bad)
    with pytest.raises(DataError, match="temperature"):
        score_flow(ScoreJob(bundle=flow_bundle["bundle"], inputs=(good, bad), output=tmp_path / "new" / "s.parquet"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.parquet", "good.parquet"]

# The demo through the CLI's own entry point, with the first step inside the training flow failing
# (too few rows, which did that, is refused before the flow now).
FAILING_DEMO = """
import sys

import pipeline.workflow
from pipeline.cli import main
from pipeline.errors import DataError


def unreadable(path, *args, **kwargs):
    raise DataError(f"{path}: unreadable table (a failure the test put in the flow)")


pipeline.workflow.read_table = unreadable
sys.exit(main())
"""


@pytest.mark.parametrize("verbose", [False, True])
def test_demo_that_fails_prints_one_error_line_and_a_traceback_only_with_verbose(tmp_path, verbose):
    """A real process: Prefect's console handler writes to the stderr it found at start-up."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env |= {"PREFECT_HOME": str(tmp_path / "prefect"), "DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    proc = subprocess.run([sys.executable, "-c", FAILING_DEMO, "demo", "--rows", "400", "--out", "exported",
                           "--work", "work", *(["--verbose"] if verbose else [])],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert errors == ["error: work/train.csv: unreadable table (a failure the test put in the flow)"], proc.stderr
    # Prefect's records of the failed task and flow repeated the error above it; --verbose keeps them.
    assert (proc.stderr.count("unreadable table") == 1) is not verbose, proc.stderr
    assert ("Task run 'load_and_validate" in proc.stderr) is verbose, proc.stderr
    assert ("Traceback" in proc.stderr) is verbose, proc.stderr
    assert not (tmp_path / "exported").exists()  # the failed run removed the --out folder it made
