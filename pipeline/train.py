"""The training loop: mini-batch Adam on the ELBO, early stopping on a validation split.

Reproducible: the seed fixes the initial weights, the shuffling and the reparameterisation
noise; thread counts are set explicitly.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from pipeline.config import ModelConfig, TrainingConfig, resolve_threads, show_progress
from pipeline.errors import ConfigError, DeviceError
from pipeline.model import VAE, default_layer_sizes, likelihood_penalty, score_components


@dataclass
class TrainResult:
    model: VAE  # best weights, on the CPU, in eval mode
    history: list[dict] = field(default_factory=list)  # one entry per epoch
    best_epoch: int = 0
    seconds: float = 0.0
    device: str = "cpu"


def select_device(requested: str) -> torch.device:
    if requested not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"device must be auto, cpu or cuda, got {requested!r}")
    if requested == "cuda" and not torch.cuda.is_available():
        raise DeviceError("device 'cuda' was asked for but torch sees no CUDA device; use --device cpu or auto")
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(requested)


def build_model(n_features: int, config: ModelConfig) -> VAE:
    hidden, latent = default_layer_sizes(n_features)
    return VAE(n_features, config.hidden_sizes or hidden, config.latent_dim or latent)


def train_vae(train_x: np.ndarray, val_x: np.ndarray, model_config: ModelConfig,
              config: TrainingConfig, build=None) -> TrainResult:
    """Train a VAE on rows (tables) or images; ``build()`` makes the model (the tabular MLP by default),
    after the seed is set so its initial weights are reproducible."""
    torch.set_num_threads(resolve_threads(config.threads))
    torch.manual_seed(config.seed)
    device = select_device(config.device)
    model = (build() if build else build_model(train_x.shape[1], model_config)).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    train_t = torch.as_tensor(train_x, dtype=torch.float32, device=device)
    val_t = torch.as_tensor(val_x, dtype=torch.float32, device=device)
    shuffle = torch.Generator(device="cpu").manual_seed(config.seed)
    beta = model_config.beta

    show = show_progress(config.progress)
    bar = tqdm(range(1, config.max_epochs + 1), desc="training", unit="epoch", disable=not show, leave=False)
    started = time.perf_counter()
    result = TrainResult(model=model, device=str(device))
    best_loss, best_state, stale = math.inf, copy.deepcopy(model.state_dict()), 0
    for epoch in bar:
        model.train()
        order = torch.randperm(len(train_t), generator=shuffle).to(device)
        sums = np.zeros(2)
        for start in range(0, len(order), config.batch_size):
            batch = train_t[order[start:start + config.batch_size]]
            x_hat, mu, logvar = model(batch, sample=True)
            log_scale = model.decoder.bounded_log_scale()
            recon, kl = score_components(batch, x_hat, mu, logvar, log_scale)
            loss = (recon + beta * kl).mean() + likelihood_penalty(log_scale)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            sums += [recon.sum().item(), kl.sum().item()]
        val_recon, val_kl = _evaluate(model, val_t)
        val_loss = val_recon + beta * val_kl + likelihood_penalty(model.decoder.bounded_log_scale()).item()
        result.history.append({
            "epoch": epoch,
            "train_recon": sums[0] / len(train_t), "train_kl": sums[1] / len(train_t),
            "val_recon": val_recon, "val_kl": val_kl, "val_loss": val_loss,
        })
        bar.set_postfix(val_loss=f"{val_loss:.4f}")
        if not math.isfinite(best_loss) or val_loss < best_loss - 1e-4 * abs(best_loss):
            best_loss, best_state, stale, result.best_epoch = val_loss, copy.deepcopy(model.state_dict()), 0, epoch
        else:
            stale += 1
            if stale >= config.patience:
                break
    bar.close()
    model.load_state_dict(best_state)
    result.model = model.cpu().eval()
    result.seconds = time.perf_counter() - started
    return result


@torch.no_grad()
def _evaluate(model: VAE, x: torch.Tensor, chunk: int = 65_536) -> tuple[float, float]:
    """Mean recon and KL with z = mu: the quantity the anomaly score is made of."""
    model.eval()
    recon_sum = kl_sum = 0.0
    for start in range(0, len(x), chunk):
        batch = x[start:start + chunk]
        x_hat, mu, logvar = model(batch, sample=False)
        recon, kl = score_components(batch, x_hat, mu, logvar, model.decoder.bounded_log_scale())
        recon_sum += recon.sum().item()
        kl_sum += kl.sum().item()
    return recon_sum / len(x), kl_sum / len(x)
