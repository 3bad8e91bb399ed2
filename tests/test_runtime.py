import logging

import pytest

from pipeline.bundle import Bundle
from pipeline.errors import ConfigError, DeviceError
from pipeline.runtime import BundleScorer, create_session, gpu_present

no_gpu = pytest.mark.skipif(gpu_present(), reason="checks the behaviour of a machine without a GPU")


@no_gpu
def test_cuda_fails_clearly_when_not_active(trained_bundle):
    with pytest.raises(DeviceError, match=r"--device cuda .* not active .* --device cpu"):
        create_session(Bundle.load(trained_bundle).scorer_path, "cuda")


@no_gpu
def test_auto_falls_back_to_cpu_with_one_warning(trained_bundle, caplog):
    with caplog.at_level(logging.WARNING, logger="vaeguard"):
        scorer = BundleScorer(Bundle.load(trained_bundle), device="auto")
    assert scorer.device == "cpu"
    assert len([r for r in caplog.records if "CUDA is not active" in r.message]) == 1


def test_unknown_device_is_a_config_error(trained_bundle):
    with pytest.raises(ConfigError, match="auto, cpu or cuda"):
        create_session(Bundle.load(trained_bundle).scorer_path, "tpu")


@pytest.mark.gpu
def test_cuda_session_is_really_on_cuda_and_matches_cpu(trained_bundle, sensor_frame):
    import numpy as np

    bundle = Bundle.load(trained_bundle)
    gpu, cpu = BundleScorer(bundle, device="cuda"), BundleScorer(bundle, device="cpu")
    assert gpu.session.get_providers()[0] == "CUDAExecutionProvider"
    a, b = gpu.score_frame(sensor_frame), cpu.score_frame(sensor_frame)
    np.testing.assert_allclose(a["score"], b["score"], rtol=1e-4, atol=1e-4)
    assert (a["is_anomaly"] == b["is_anomaly"]).mean() > 0.999
