"""The convolutional VAE for images: a pure nn.Module, like pipeline.model's MLP VAE.

Sized from the image side: stride-2 convolutions halve the map until it is at most 7 pixels
(8x8 digits: one step; 64x64: four), then a dense layer to the latent code. The decoder
mirrors it with nearest-neighbour upsampling to the exact sizes the encoder saw (no
transposed-convolution checkerboard, and any side length works) and a linear output layer.
The per-pixel learned likelihood scale plays the role of the tabular per-feature one: pixels
that are always alike (background) weigh more than busy texture, so a defect on a calm
background stands out.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from pipeline.model import ELU, LOGVAR_MAX, LOGVAR_MIN, LOG_SCALE_MAX, LOG_SCALE_MIN, elu


def feature_map_sizes(size: int) -> list[int]:
    """Spatial sides after each stride-2 convolution (kernel 3, padding 1 gives ceil(s / 2))."""
    sizes = [size]
    while sizes[-1] >= 8:
        sizes.append(math.ceil(sizes[-1] / 2))
    return sizes


def channel_widths(steps: int) -> list[int]:
    return [min(32 * 2 ** i, 128) for i in range(max(steps, 1))]


class ConvEncoder(nn.Module):
    def __init__(self, channels: int, size: int, latent_dim: int):
        super().__init__()
        sizes = feature_map_sizes(size)
        widths = channel_widths(len(sizes) - 1)
        layers: list[nn.Module] = []
        n_in = channels
        for width in widths[: len(sizes) - 1] or widths:
            stride = 2 if len(sizes) > 1 else 1
            layers += [nn.Conv2d(n_in, width, 3, stride=stride, padding=1), ELU()]
            n_in = width
        self.body = nn.Sequential(*layers, nn.Flatten())
        flat = n_in * sizes[-1] ** 2
        self.mu = nn.Linear(flat, latent_dim)
        self.logvar = nn.Linear(flat, latent_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.body(x)
        return self.mu(h), self.logvar(h).clamp(LOGVAR_MIN, LOGVAR_MAX)


class ConvDecoder(nn.Module):
    def __init__(self, channels: int, size: int, latent_dim: int):
        super().__init__()
        self.sizes = feature_map_sizes(size)
        widths = channel_widths(len(self.sizes) - 1)
        self.top_width = widths[-1]
        self.dense = nn.Linear(latent_dim, self.top_width * self.sizes[-1] ** 2)
        # One conv per upsampling step, from the deepest map back to the input size.
        steps = list(reversed(widths))
        self.convs = nn.ModuleList(
            nn.Conv2d(n_in, n_out, 3, padding=1) for n_in, n_out in zip(steps, steps[1:] + [steps[-1]])
        )
        self.out = nn.Conv2d(steps[-1], channels, 3, padding=1)
        self.log_scale = nn.Parameter(torch.zeros(channels, size, size))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        side = self.sizes[-1]
        h = elu(self.dense(z)).reshape(-1, self.top_width, side, side)
        targets = list(reversed(self.sizes[:-1])) or [self.sizes[0]]
        for conv, target in zip(self.convs, targets):
            h = elu(conv(F.interpolate(h, size=(target, target), mode="nearest")))
        return self.out(h)

    def bounded_log_scale(self) -> torch.Tensor:
        return self.log_scale.clamp(LOG_SCALE_MIN, LOG_SCALE_MAX)


class ConvVAE(nn.Module):
    def __init__(self, channels: int, size: int, latent_dim: int = 16):
        super().__init__()
        self.channels, self.size, self.latent_dim = channels, size, latent_dim
        self.encoder = ConvEncoder(channels, size, latent_dim)
        self.decoder = ConvDecoder(channels, size, latent_dim)

    def forward(self, x: torch.Tensor, sample: bool = True):
        mu, logvar = self.encoder(x)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar) if sample else mu
        return self.decoder(z), mu, logvar

    def config(self) -> dict:
        return {"kind": "conv", "channels": self.channels, "size": self.size, "latent_dim": self.latent_dim,
                "feature_map_sizes": self.decoder.sizes, "activation": "elu"}
