"""The demo behind `make demo`: generated sensor data, trained and scored through Prefect."""

from __future__ import annotations

import json
from pathlib import Path

from flows.score import score_flow
from flows.train import train_flow
from pipeline.config import PipelineConfig, ScoreJob, TrainJob
from pipeline.errors import ConfigError
from pipeline.outputs import summary_path
from pipeline.splits import rows_needed
from pipeline.synthetic import SyntheticSpec, make_sensor_table, write_table


def run_demo(rows: int = 20_000, out_dir: Path = Path("exported"), work_dir: Path = Path("runs/demo")) -> dict:
    job = TrainJob(data=work_dir / "train.csv", name="demo", out_dir=out_dir, label_column="label",
                   id_columns=("row_id",))
    check_demo_rows(rows, job.config)
    train_csv = write_table(make_sensor_table(training_spec(rows)), job.data)
    # A later "night's" batch from the same machines, with its own injected anomalies.
    incoming = write_table(make_sensor_table(SyntheticSpec(n_rows=max(rows // 2, 1000), seed=1)),
                           work_dir / "incoming.csv")
    trained = train_flow(job)
    output = work_dir / "scores.parquet"
    scored = score_flow(ScoreJob(bundle=Path(trained["bundle"]), inputs=(incoming,), output=output))
    held_out = trained["calibrate_threshold"]
    print("\nvaeguard demo finished")
    print(f"  training data:  {train_csv}")
    print(f"  bundle:         {trained['bundle']}  (inspect it: vaeguard inspect {trained['bundle']})")
    print(f"  report:         {Path(trained['bundle']) / 'report.html'}")
    print(f"  scores:         {output}")
    print(f"  summary:        {summary_path(output)}")
    print(f"  held-out AUROC on injected anomalies (training split): {held_out['auroc']:.4f}")
    print(f"  AUROC on the new batch {incoming.name}: {scored['files'][0]['auroc']:.4f}; "
          f"{scored['anomalies']:,} of {scored['rows']:,} rows flagged "
          f"({scored['anomaly_rate']:.2%}, target FPR {scored['target_fpr']:.2%})")
    return {"train": trained, "score": scored, "summary": json.loads(summary_path(output).read_text())}


def training_spec(rows: int) -> SyntheticSpec:
    return SyntheticSpec(n_rows=rows, seed=0)


def demo_rows_needed(config: PipelineConfig) -> int:
    """The fewest rows the demo trains on: a generated table whose normal rows are as many as the
    training flow's splits need (pipeline.splits), the injected anomalies aside."""
    normal_needed = rows_needed(config.calibration, config.training, labelled=True)
    rows = normal_needed
    while int((make_sensor_table(training_spec(rows))["label"] == 0).sum()) < normal_needed:
        rows += 1
    return rows


def check_demo_rows(rows: int, config: PipelineConfig) -> None:
    """Enough rows to train on, or a one-line ConfigError before any file is written or Prefect
    reached: the training flow refused too few only once it ran, and its message said to raise
    --target-fpr, which `vaeguard demo` does not take."""
    needed = demo_rows_needed(config)
    if rows < needed:
        raise ConfigError(f"--rows {rows}: the demo needs at least {needed} rows (training and calibrating at target "
                          f"FPR {config.calibration.target_fpr} takes "
                          f"{rows_needed(config.calibration, config.training, labelled=True)} normal ones, and "
                          f"{training_spec(needed).anomaly_fraction:.0%} of the generated rows are anomalies); "
                          f"pass --rows {needed} or more")
