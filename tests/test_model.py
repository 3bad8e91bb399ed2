import dataclasses

import numpy as np
import torch

import pytest

from pipeline.config import ModelConfig, TrainingConfig
from pipeline.errors import ConfigError, TrainingError
from pipeline.model import ACTIVATIONS, VAE, default_layer_sizes, score_components
from pipeline.train import build_model, train_vae


def test_scores_use_mu_and_are_deterministic():
    torch.manual_seed(0)
    vae = VAE(6, (16, 8), 3, "silu").eval()
    x = torch.randn(32, 6)
    first = vae(x, sample=False)
    second = vae(x, sample=False)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    recon, kl = score_components(x, *first, vae.decoder.bounded_log_scale())
    assert recon.shape == kl.shape == (32,) and bool((recon >= 0).all()) and bool((kl >= 0).all())


def test_output_layer_reconstructs_negative_values():
    # A linear output (no ReLU) can produce the negative standardized values it must rebuild.
    vae = VAE(4, (8,), 2, "silu")
    assert isinstance(vae.decoder.out, torch.nn.Linear)


def test_layer_sizes_follow_the_feature_count():
    assert default_layer_sizes(6)[0][0] < default_layer_sizes(500)[0][0]
    assert build_model(10, ModelConfig(hidden_sizes=(7,), latent_dim=2)).hidden_sizes == (7,)


def test_training_is_reproducible_and_learns():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(600, 2))
    data = np.c_[z, z @ rng.normal(size=(2, 4))].astype(np.float32)  # 6 features on a 2-D plane
    config = TrainingConfig(max_epochs=15, patience=5, threads=1, progress=False, seed=3)
    a = train_vae(data[:500], data[500:], ModelConfig(), config)
    b = train_vae(data[:500], data[500:], ModelConfig(), config)
    for key, value in a.model.state_dict().items():
        assert torch.equal(value, b.model.state_dict()[key])
    losses = [h["val_loss"] for h in a.history]
    assert min(losses) < losses[0]
    assert a.history[a.best_epoch - 1]["val_loss"] == min(losses)


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_activation_is_a_setting_and_round_trips_through_the_config(name):
    vae = build_model(6, ModelConfig(activation=name))
    hidden = [type(m) for m in vae.encoder.body] + [type(m) for m in vae.decoder.body]
    assert type(ACTIVATIONS[name]()) in hidden
    rebuilt = VAE.from_config(vae.config())
    rebuilt.load_state_dict(vae.state_dict())
    x = torch.randn(5, 6)
    assert torch.equal(rebuilt(x, sample=False)[0], vae(x, sample=False)[0])


def test_unknown_activation_is_a_config_error():
    with pytest.raises(ConfigError, match="model.activation must be one of"):
        build_model(6, ModelConfig(activation="swish"))


def test_trim_fraction_out_of_range_is_a_config_error():
    rows = np.zeros((8, 3), np.float32)
    with pytest.raises(ConfigError, match="trim_fraction must be at least 0 and below 0.5, got 0.5"):
        train_vae(rows, rows, ModelConfig(), TrainingConfig(trim_fraction=0.5, progress=False))


def test_trimming_leaves_the_worst_fitting_rows_out_of_the_loss():
    """Rows far off the data's plane fit worst from the first batch on. Trimmed away, they leave
    the decoder's noise scale where clean data puts it; counted, they widen it."""
    rng = np.random.default_rng(0)
    z = rng.normal(size=(760, 2))
    plane = np.c_[z, z @ rng.normal(size=(2, 4))].astype(np.float32)
    wild = (rng.normal(size=(40, 6)) * 20).astype(np.float32)  # 5% of the rows
    rows = np.r_[plane, wild][rng.permutation(800)]
    config = TrainingConfig(max_epochs=40, patience=40, threads=1, progress=False, seed=1)

    def log_scale(data: np.ndarray, trim: float) -> float:
        model = train_vae(data, plane[:100], ModelConfig(), dataclasses.replace(config, trim_fraction=trim)).model
        return float(model.decoder.bounded_log_scale().mean().detach())

    clean, counted, trimmed = log_scale(plane, 0.0), log_scale(rows, 0.0), log_scale(rows, 0.1)
    assert counted > clean + 0.4
    assert abs(trimmed - clean) < 0.2


def test_a_diverging_loss_stops_training_with_a_clear_error():
    """NaN weights would export, score every row NaN and flag none: training refuses to finish."""
    x = np.random.default_rng(0).normal(size=(500, 6)).astype(np.float32)
    with pytest.raises(TrainingError, match=r"training diverged: the loss became nan at epoch 1; lower "
                                            r"training.learning_rate \(now 1000\)"):
        train_vae(x[:400], x[400:], ModelConfig(), TrainingConfig(learning_rate=1e3, max_epochs=5, progress=False))
