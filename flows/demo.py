"""The demo behind `make demo`: generated sensor data, trained and scored through Prefect."""

from __future__ import annotations

import json
from pathlib import Path

from flows.score import score_flow
from flows.train import train_flow
from pipeline.outputs import summary_path
from pipeline.config import ScoreJob, TrainJob
from pipeline.synthetic import SyntheticSpec, make_sensor_table, write_table


def run_demo(rows: int = 20_000, out_dir: Path = Path("exported"), work_dir: Path = Path("runs/demo")) -> dict:
    train_csv = write_table(make_sensor_table(SyntheticSpec(n_rows=rows, seed=0)), work_dir / "train.csv")
    # A later "night's" batch from the same machines, with its own injected anomalies.
    incoming = write_table(make_sensor_table(SyntheticSpec(n_rows=max(rows // 2, 1000), seed=1)),
                           work_dir / "incoming.csv")
    trained = train_flow(TrainJob(data=train_csv, name="demo", out_dir=out_dir, label_column="label",
                                  id_columns=("row_id",)))
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
