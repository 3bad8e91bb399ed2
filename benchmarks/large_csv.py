"""Streaming a large CSV through `vaeguard score`: throughput against parse-only, and peak memory.

    python -m benchmarks.large_csv --rows 5000000

Generates the CSV (and a bundle trained on 20,000 rows of the same generator) under
runs/bench/ unless they exist, then measures, in this one run on this machine:
- parse-only: pyarrow's streaming CSV reader over the file with the scorer's column types
  (the practical limit for CSV scoring);
- score: `vaeguard score` end to end in a subprocess (parse, score, write Parquet);
- the scoring process's peak resident memory, against the file size.
Parse and score run in turns, 3 times each; the figures are the best of each (and the largest peak).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv

from pipeline.bundle import Bundle
from pipeline.config import PipelineConfig, TrainJob
from pipeline.synthetic import SyntheticSpec, make_sensor_table, write_table
from pipeline.tables import iter_batches
from pipeline.workflow import run_training

REPEATS = 3


def make_csv(path: Path, rows: int) -> None:
    chunk = 1_000_000
    first = make_sensor_table(SyntheticSpec(n_rows=min(rows, chunk), seed=100))
    with pacsv.CSVWriter(path, pa.Table.from_pandas(first, preserve_index=False).schema) as writer:
        for i, start in enumerate(range(0, rows, chunk)):
            frame = first if i == 0 else make_sensor_table(SyntheticSpec(n_rows=min(chunk, rows - start), seed=100 + i))
            writer.write_table(pa.Table.from_pandas(frame, preserve_index=False))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=5_000_000)
    parser.add_argument("--work", type=Path, default=Path("runs/bench"))
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)

    bundle_dir = args.work / "exported" / "bench"
    if not bundle_dir.exists():
        train = write_table(make_sensor_table(SyntheticSpec(n_rows=20_000, seed=0)), args.work / "train.csv")
        run_training(TrainJob(data=train, name="bench", out_dir=args.work / "exported", label_column="label",
                              id_columns=("row_id",), config=PipelineConfig()))
    csv = args.work / f"sensors_{args.rows}.csv"
    if not csv.exists():
        make_csv(csv, args.rows)

    schema = Bundle.load(bundle_dir).schema
    output = args.work / "scores.parquet"
    parse_seconds = score_seconds = float("inf")
    for _ in range(REPEATS):  # in turns, best of each: a neighbour's load slows both alike
        started = time.perf_counter()
        parsed = sum(b.num_rows for b in iter_batches(csv, list(schema.numeric), list(schema.categorical),
                                                        list(schema.id_columns), 65_536))
        parse_seconds = min(parse_seconds, time.perf_counter() - started)
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "pipeline.cli", "score", str(bundle_dir), str(csv), "--output",
                        str(output), "--device", "cpu"], check=True, stdout=subprocess.DEVNULL)
        score_seconds = min(score_seconds, time.perf_counter() - started)
    # The largest of the scoring processes' peaks (RUSAGE_CHILDREN keeps the maximum).
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024

    result = {
        "rows": parsed, "file_mb": round(csv.stat().st_size / 1e6),
        "parse_rows_per_s": round(parsed / parse_seconds), "score_rows_per_s": round(parsed / score_seconds),
        "score_over_parse": round(parse_seconds / score_seconds, 3), "score_peak_rss_mb": round(peak_mb),
        "repeats": REPEATS,
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
