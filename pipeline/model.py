"""The variational autoencoder: a pure nn.Module, no training loop, no I/O.

Encoder: features -> (mu, logvar). Decoder: z -> reconstruction, with a linear output layer
because standardized features are negative as often as positive (a ReLU output could not
reconstruct them), and a learned per-feature likelihood scale. Sampling happens only in ``forward`` during training; every score uses
z = mu so it is the same on every run and in every runtime.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

# Bounds on log-variance keep exp() finite for wildly out-of-distribution rows.
LOGVAR_MIN, LOGVAR_MAX = -12.0, 12.0
LOG_SCALE_MIN, LOG_SCALE_MAX = -5.0, 5.0


def default_layer_sizes(n_features: int) -> tuple[tuple[int, ...], int]:
    """Width tied to the input: wide enough for 1,500 one-hot features, small for 6 sensors."""
    first = int(min(256, max(32, 2 * n_features)))
    second = int(min(128, max(16, n_features)))
    latent = int(min(16, max(2, n_features // 4)))
    return (first, second), latent


def elu(x: torch.Tensor) -> torch.Tensor:
    """ELU; in an ONNX export spelled Max(x, 0) + Exp(Min(x, 0)) - 1 instead of one Elu node.

    onnxruntime's CPU Elu can differ in the last bit with where an element falls in the work
    split among threads, so a row's or an image's score moved (by about 1e-6) with the batch it
    was scored in: with the batch size, with its place in the file, with a bad row before it.
    Exp, Min and Max give the same bits at every position. exp(x) - 1 instead of expm1 costs
    about 1e-7 absolute; training keeps the one fused kernel.
    """
    if torch.onnx.is_in_onnx_export():
        return torch.clamp(x, min=0) + (torch.exp(torch.clamp(x, max=0)) - 1)
    return F.elu(x)


class ELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return elu(x)


# Hidden-layer activations a model may be built with (``model.activation``, checked in
# pipeline.train.build_model); the name is recorded in the manifest.
ACTIVATIONS = {"elu": ELU, "silu": nn.SiLU, "tanh": nn.Tanh, "leaky_relu": lambda: nn.LeakyReLU(0.1), "relu": nn.ReLU}


def _mlp(sizes: list[int], activation: str) -> nn.Sequential:
    layers: list[nn.Module] = []
    for n_in, n_out in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(n_in, n_out), ACTIVATIONS[activation]()]
    return nn.Sequential(*layers)


class Encoder(nn.Module):
    def __init__(self, n_features: int, hidden_sizes: tuple[int, ...], latent_dim: int, activation: str):
        super().__init__()
        self.body = _mlp([n_features, *hidden_sizes], activation)
        self.mu = nn.Linear(hidden_sizes[-1], latent_dim)
        self.logvar = nn.Linear(hidden_sizes[-1], latent_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.body(x)
        return self.mu(h), self.logvar(h).clamp(LOGVAR_MIN, LOGVAR_MAX)


class Decoder(nn.Module):
    def __init__(self, n_features: int, hidden_sizes: tuple[int, ...], latent_dim: int, activation: str):
        super().__init__()
        reversed_sizes = list(reversed(hidden_sizes))
        self.body = _mlp([latent_dim, *reversed_sizes], activation)
        self.out = nn.Linear(reversed_sizes[-1], n_features)
        # Per-feature log standard deviation of the Gaussian likelihood, learned with the
        # weights: features the model can predict from the others (correlated sensors) get a
        # small sigma, so breaking their relation costs much more than noise in a free feature.
        self.log_scale = nn.Parameter(torch.zeros(n_features))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.out(self.body(z))

    def bounded_log_scale(self) -> torch.Tensor:
        # Bounds keep one perfectly predictable feature from dominating every score.
        return self.log_scale.clamp(LOG_SCALE_MIN, LOG_SCALE_MAX)


class VAE(nn.Module):
    def __init__(self, n_features: int, hidden_sizes: tuple[int, ...], latent_dim: int, activation: str):
        super().__init__()
        self.n_features, self.hidden_sizes, self.latent_dim = n_features, tuple(hidden_sizes), latent_dim
        self.activation = activation
        self.encoder = Encoder(n_features, self.hidden_sizes, latent_dim, activation)
        self.decoder = Decoder(n_features, self.hidden_sizes, latent_dim, activation)

    def forward(self, x: torch.Tensor, sample: bool = True):
        mu, logvar = self.encoder(x)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar) if sample else mu
        return self.decoder(z), mu, logvar

    def config(self) -> dict:
        return {"n_features": self.n_features, "hidden_sizes": list(self.hidden_sizes),
                "latent_dim": self.latent_dim, "activation": self.activation}

    @classmethod
    def from_config(cls, config: dict) -> "VAE":
        """The inverse of ``config()``; bundles from before the activation was a setting used ELU."""
        return cls(config["n_features"], tuple(config["hidden_sizes"]), config["latent_dim"],
                   config.get("activation", "elu"))


def score_components(x: torch.Tensor, x_hat: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor,
                     log_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row reconstruction error and KL divergence, both in nats.

    recon: Gaussian negative log-likelihood of x under N(x_hat, sigma^2) with the decoder's
    learned per-feature sigma, without the terms that are equal for every row (sum log sigma
    and the 2 pi constant): 0.5 * sum_j ((x_j - x_hat_j) / sigma_j)^2. Training adds
    sum log sigma back (``likelihood_penalty``), which is what lets sigma be learned.
    kl: KL(N(mu, exp(logvar)) || N(0, I)), summed over latent dimensions.
    """
    recon = error_map(x, x_hat, log_scale).flatten(1).sum(dim=1)
    return recon, kl_divergence(mu, logvar)


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) per row of [B, latent], summed over latent dimensions."""
    return 0.5 * (mu * mu + logvar.exp() - 1.0 - logvar).sum(dim=1)


def error_map(x: torch.Tensor, x_hat: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """Each feature's (or pixel's) share of recon; works for [B, features] and [B, C, H, W]."""
    # d * d, not pow(2): the same values, and onnxruntime's Pow costs twice its Mul.
    scaled = (x - x_hat) * torch.exp(-log_scale)
    return 0.5 * (scaled * scaled)


def likelihood_penalty(log_scale: torch.Tensor) -> torch.Tensor:
    """The row-independent part of the Gaussian NLL: sum_j log sigma_j."""
    return log_scale.sum()
