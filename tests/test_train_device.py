"""Training on CUDA: when mixed precision is used, and (on a GPU) that a bf16 image run exports.

The choice of autocast dtype is tested without a GPU (a torch.device("cuda") needs no GPU to
exist); the end-to-end run is marked ``gpu`` and skipped without one.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.bundle import Bundle
from pipeline.config import (CalibrationConfig, ImageTrainJob, ModelConfig, PipelineConfig, ScoreJob, TrainingConfig,
                             load_config)
from pipeline.errors import ConfigError
from pipeline.outputs import summary_path
from pipeline.train import autocast_dtype, train_vae

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def test_cuda_trains_in_fp32_unless_bf16_is_asked_for():
    # bf16 autocast was never faster on an H100 (pipeline.train.autocast_dtype), so auto is fp32.
    assert autocast_dtype(CUDA) is None
    assert autocast_dtype(CUDA, "fp32") is None
    assert autocast_dtype(CUDA, "bf16") is torch.bfloat16


def test_cpu_always_trains_in_fp32():
    for mode in ("auto", "fp32", "bf16"):
        assert autocast_dtype(CPU, mode) is None


def test_unknown_mixed_precision_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="auto, fp32 or bf16, got 'fp16'"):
        autocast_dtype(CPU, "fp16")
    path = tmp_path / "config.yaml"
    path.write_text("training:\n  mixed_precision: fp32\n")
    assert load_config(path).training.mixed_precision == "fp32"


def test_cpu_training_records_fp32():
    data = np.random.default_rng(0).normal(size=(300, 5)).astype(np.float32)
    result = train_vae(data[:250], data[250:], ModelConfig(),
                       TrainingConfig(max_epochs=2, patience=2, threads=1, progress=False, device="cpu"))
    assert result.mixed_precision == "fp32"
    assert all(isinstance(h["train_recon"], float) for h in result.history)


@pytest.mark.gpu
def test_one_epoch_of_image_training_on_cuda_in_bf16_exports_and_verifies(tmp_path):
    from pipeline.image_workflow import run_image_training
    from pipeline.scoring import score

    rng = np.random.default_rng(0)
    blobs = np.clip(rng.normal(0.5, 0.15, size=(300, 8, 8)), 0, 1).astype(np.float32)
    np.save(tmp_path / "normal.npy", blobs)
    config = PipelineConfig(training=TrainingConfig(max_epochs=1, patience=1, batch_size=32, threads=2,
                                                    progress=False, device="cuda", mixed_precision="bf16"),
                            calibration=CalibrationConfig(target_fpr=0.05))
    facts = run_image_training(ImageTrainJob(data=tmp_path / "normal.npy", name="gpu", out_dir=tmp_path / "out",
                                             image_size=8, channels=1, config=config))
    assert facts["train_model"]["device"].startswith("cuda")
    assert facts["train_model"]["mixed_precision"] == "bf16"
    bundle = Bundle.load(Path(facts["bundle"]))  # hashes checked
    assert bundle.manifest["training"]["mixed_precision"] == "bf16"
    assert bundle.manifest["verification"]
    scores = {}
    for run, device in (("cuda", "cuda"), ("cuda again", "cuda"), ("cpu", "cpu")):
        output = tmp_path / f"{run.replace(' ', '_')}.parquet"
        summary = score(ScoreJob(bundle=bundle.path, inputs=(tmp_path / "normal.npy",), output=output, device=device))
        assert summary.device == device and summary.rows == 300
        assert json.loads(summary_path(output).read_text())["device"] == device
        scores[run] = pd.read_parquet(output)["score"].to_numpy()
    # Convolutions on CUDA: the same scores in a new session, and the CPU's to float rounding.
    assert np.array_equal(scores["cuda"], scores["cuda again"])
    np.testing.assert_allclose(scores["cuda"], scores["cpu"], rtol=1e-5)
