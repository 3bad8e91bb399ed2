"""benchmarks/gpu.py without a GPU: the environment report, the rates and the tables it prints."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks import gpu
from pipeline.runtime import gpu_present


def test_environment_reports_providers_and_whether_cuda_starts():
    env = gpu.environment([])
    assert "CPUExecutionProvider" in env["onnxruntime"]["providers"]
    assert env["onnxruntime"]["device"] in ("CPU", "GPU")
    assert set(env["cuda_libraries_missing"]) <= set(gpu.LIBRARY_ORDER) | {"libcuda.so.1"}
    if not gpu_present():
        assert env["onnxruntime_cuda"]["active"] is False
        assert "--device cpu" in env["onnxruntime_cuda"]["why"]


def test_best_rates_and_markdown():
    rates = gpu.best_rates({"cpu": lambda n: None, "cuda (BundleScorer)": lambda n: None}, (10, 20), repeats=2)
    assert set(rates) == {"cpu", "cuda (BundleScorer)"} and set(rates["cpu"]) == {10, 20}
    result = {"repeats": 2, "environment": gpu.environment([]), "notes": [f"{gpu.NO_CUDA} for scoring: why"],
              "training": [{"model": "tabular MLP VAE", "device": "cpu", "mixed_precision": "fp32", "train_rows": 100,
                            "epochs": 2, "batch_size": 128, "seconds_per_epoch": 0.1, "train_seconds": 0.2,
                            "auroc": 0.9}],
              "scoring_table": rates, "scoring_images": None,
              "file_scoring": {"rows": 1000, "repeats": 2, "parse_rows_per_s": 4000, "cpu_rows_per_s": 3000,
                               "cpu_over_parse": 0.75},
              "agreement": {"tabular": gpu.agreement(lambda: np.array([1.0, 2.0, 3.0]), lambda: np.array([1.0, 2.5, 3.0]),
                                                     threshold=2.2)}}
    assert result["agreement"]["tabular"] == {"rows": 3, "max_relative_difference": 0.25, "decisions_differ": 1,
                                              "cuda_repeats_exactly": True}
    text = gpu.markdown(result)
    assert "| 20 | " in text and "vaeguard's cuda / cpu" in text and "AUROC 0.9000" in text
    assert "| tabular | 3 | 2.50e-01 | 1 | exactly |" in text
    assert "| `vaeguard score --device cpu` | 3,000 | 0.75x |" in text and "score --device cuda" not in text
    assert "no CUDA: GPU rows skipped" in text


@pytest.mark.parametrize("error", [ValueError("bad\nsecond line"), OSError()])
def test_a_failed_part_is_noted_in_one_line(error):
    notes = []

    def fail():
        raise error

    assert gpu.attempt(notes, "image training", fail) is None
    assert len(notes) == 1 and "\n" not in notes[0] and notes[0].startswith("image training skipped: ")


@pytest.mark.skipif(gpu_present(), reason="checks the behaviour of a machine without a GPU")
def test_the_cuda_comparisons_say_they_need_a_gpu(capsys):
    from benchmarks import autocast_speed, cuda_options

    assert cuda_options.main([]) == 2 and autocast_speed.main([]) == 2
    err = capsys.readouterr().err
    assert "cuda_options needs onnxruntime-gpu and torch with a CUDA GPU" in err
    assert "autocast_speed needs torch with a CUDA GPU" in err
    assert set(cuda_options.TABULAR_SETTINGS) <= set(cuda_options.SETTINGS)
