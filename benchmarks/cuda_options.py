"""onnxruntime's CUDA provider settings against the CPU: score differences, repeatability, speed.

    python -m benchmarks.cuda_options [--rows 200000] [--images 16384]

Needs onnxruntime-gpu with a working CUDA provider and torch with CUDA (the image VAE trains
there for 2 epochs). Trains a small sensor-table bundle (20,000 rows, 10 epochs, on the CPU)
and an image bundle (3,000 28x28 strokes). Then, for each row of SETTINGS, it opens three fresh
CUDA sessions of each scorer. It reports the largest relative score difference against the CPU,
the decisions that differ, whether the three sessions agree bit for bit, and the best of 5 rates
after a warm-up. This is the comparison behind pipeline.contract.CUDA_PROVIDER_OPTIONS
(BENCHMARKS.md, "GPU").
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

# (provider options, use_deterministic_compute); the image scorer tries every row, the tabular
# scorer (no convolutions) the rows that differ in TF32 only.
SETTINGS = {
    "onnxruntime defaults": ({}, False),
    "TF32 off": ({"use_tf32": "0"}, False),
    "TF32 off, DEFAULT algorithm, deterministic": ({"use_tf32": "0", "cudnn_conv_algo_search": "DEFAULT"}, True),
    "TF32 off, heuristic search, deterministic (vaeguard)": (
        {"use_tf32": "0", "cudnn_conv_algo_search": "HEURISTIC"}, True),
    "TF32 off, timed search, deterministic": ({"use_tf32": "0", "cudnn_conv_algo_search": "EXHAUSTIVE"}, True),
}
TABULAR_SETTINGS = ("onnxruntime defaults", "TF32 off", "TF32 off, heuristic search, deterministic (vaeguard)")


def compare(path: Path, feeds: dict, threshold: float, names: tuple[str, ...]) -> dict:
    import onnxruntime as ort

    cpu = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(["score"], feeds)[0]
    out = {}
    for name in names:
        options, deterministic = SETTINGS[name]
        runs = []
        for _ in range(3):
            session_options = ort.SessionOptions()
            session_options.use_deterministic_compute = deterministic
            session = ort.InferenceSession(str(path), session_options,
                                           providers=[("CUDAExecutionProvider", options), "CPUExecutionProvider"])
            if session.get_providers()[0] != "CUDAExecutionProvider":
                raise RuntimeError("onnxruntime's CUDA provider did not start")
            session.run(["score"], feeds)
            best = float("inf")
            for _ in range(5):
                started = time.perf_counter()
                scores = session.run(["score"], feeds)[0]
                best = min(best, time.perf_counter() - started)
            runs.append((scores, best))
        first = runs[0][0]
        relative = np.abs(first - cpu) / np.maximum(np.abs(cpu), 1e-6)
        out[name] = {"max_rel_vs_cpu": float(relative.max()),
                     "decisions_differ": int(((first > threshold) != (cpu > threshold)).sum()), "rows": len(first),
                     "repeat_identical": all(np.array_equal(first, scores) for scores, _ in runs[1:]),
                     "rows_per_s": round(len(first) / min(seconds for _, seconds in runs))}
        print(name, json.dumps(out[name]), flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--images", type=int, default=16_384)
    args = parser.parse_args(argv)
    import onnxruntime as ort
    import torch

    if "CUDAExecutionProvider" not in ort.get_available_providers() or not torch.cuda.is_available():
        print("benchmarks.cuda_options needs onnxruntime-gpu and torch with a CUDA GPU; none here", file=sys.stderr)
        return 2

    from benchmarks.image_epoch import make_strokes
    from pipeline.bundle import Bundle
    from pipeline.config import CalibrationConfig, ImageTrainJob, PipelineConfig, TrainingConfig, TrainJob
    from pipeline.contract import IMAGE_INPUT, categorical_input_name
    from pipeline.cuda_libraries import preload_cuda_libraries
    from pipeline.image_workflow import run_image_training
    from pipeline.schema import categorical_strings, numeric_matrix
    from pipeline.synthetic import SyntheticSpec, make_sensor_table, write_table
    from pipeline.workflow import run_training

    preload_cuda_libraries()
    with tempfile.TemporaryDirectory(prefix="vaeguard-cuda-options-") as folder:
        work = Path(folder)
        data = write_table(make_sensor_table(SyntheticSpec(n_rows=20_000, seed=0)), work / "table.parquet")
        config = PipelineConfig(training=TrainingConfig(max_epochs=10, patience=10, progress=False, device="cpu"))
        table = Bundle.load(run_training(TrainJob(data=data, name="table", out_dir=work, id_columns=("row_id",),
                                                  label_column="label", config=config))["bundle"])
        np.save(work / "strokes.npy", make_strokes(3000, 28, seed=2)[:, 0])
        image_config = PipelineConfig(training=TrainingConfig(max_epochs=2, patience=2, progress=False, device="cuda"),
                                      calibration=CalibrationConfig(target_fpr=0.05))
        images = Bundle.load(run_image_training(ImageTrainJob(data=work / "strokes.npy", name="images", out_dir=work,
                                                              image_size=28, channels=1,
                                                              config=image_config))["bundle"])
        frame = make_sensor_table(SyntheticSpec(n_rows=args.rows, seed=5))
        schema = table.schema
        table_feeds = {"numeric": np.ascontiguousarray(numeric_matrix(frame, list(schema.numeric), "generated"),
                                                       dtype=np.float32)}
        table_feeds |= {categorical_input_name(c): v for c, v in
                        zip(schema.categorical, categorical_strings(frame, list(schema.categorical)))}
        pixels = np.ascontiguousarray(np.resize(make_strokes(2048, 28, seed=3), (args.images, 1, 28, 28)))
        result = {
            "image": compare(images.scorer_path, {IMAGE_INPUT: pixels}, images.manifest["calibration"]["threshold"],
                             tuple(SETTINGS)),
            "tabular": compare(table.scorer_path, table_feeds, table.manifest["calibration"]["threshold"],
                               TABULAR_SETTINGS),
        }
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
