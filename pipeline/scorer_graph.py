"""The self-contained scorer that becomes scorer.onnx (its numeric part).

Raw numeric columns (NaN = missing) and the one-hot block of the categorical columns go in;
score, recon, kl, p_value and is_anomaly come out. Imputation, scaling, the VAE with z = mu,
the threshold and the calibration table all live inside, so another runtime reproduces the
decisions with no Python. The string -> one-hot step is added in ONNX by pipeline.onnx_graphs,
since torch has no string tensors.
"""

from __future__ import annotations

import pandas as pd
import torch
from torch import nn

from pipeline.calibrate import Calibration
from pipeline.image_model import ConvVAE
from pipeline.model import VAE, error_map, kl_divergence, score_components
from pipeline.preprocess import Preprocessor
from pipeline.schema import categorical_strings, numeric_matrix

class CalibrationTable(nn.Module):
    """Threshold and conformal p-value inside the graph, shared by the table and image scorers."""

    def __init__(self, calibration: Calibration):
        super().__init__()
        self.n = calibration.n
        table = calibration.search_table()
        self.first_step = len(table) // 2  # a Python int, so tracing unrolls the loop without warnings
        self.register_buffer("scores", torch.from_numpy(table))
        self.register_buffer("threshold", torch.tensor(calibration.threshold, dtype=torch.float32))
        self.register_buffer("overflow", torch.tensor(float("inf"), dtype=torch.float32))

    def forward(self, score: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The score as published, its conformal p-value and the decision."""
        # A value far enough out (3.3e38 in one column, say) overflows float32 inside the network,
        # where SiLU of -inf is NaN, and a NaN score compares False with the threshold: the most
        # extreme rows would pass as normal. As +inf they get the smallest p-value and are flagged,
        # in every runtime that runs this graph.
        score = torch.where(torch.isnan(score), self.overflow, score)
        # below = #{calibration scores < score}, found in log2(table size) steps of
        # Add + Gather + Less + Where. int32 counts (not int64): these steps were a fifth of the
        # scorer's time on the CPU, and half the bytes per step made them cheaper. gather (ONNX
        # GatherElements), not indexing (Gather): onnxruntime's Gather took 22 us per 6,800
        # lookups, GatherElements 2 us, and the search does 12 of them on 3,800 calibration rows.
        below = torch.zeros_like(score, dtype=torch.int32)
        step = self.first_step
        while step >= 1:
            candidate = below + step
            below = torch.where(self.scores.gather(0, candidate) < score, candidate, below)
            step //= 2
        p_value = (self.n + 1 - below).to(torch.float32) / float(self.n + 1)
        return score, p_value, score > self.threshold


class ScorerGraph(nn.Module):
    def __init__(self, vae: VAE, pre: Preprocessor, kl_weight: float,
                 calibration: Calibration | None = None):
        super().__init__()
        self.vae = vae
        self.kl_weight = float(kl_weight)
        self.has_numeric = len(pre.numeric) > 0
        self.has_onehot = pre.n_onehot > 0
        self.register_buffer("median", torch.tensor([s.median for s in pre.numeric], dtype=torch.float32))
        self.register_buffer("scale", torch.tensor([s.scale for s in pre.numeric], dtype=torch.float32))
        self.register_buffer("indicator_index", torch.tensor(pre.indicator_index, dtype=torch.long))
        self.table = CalibrationTable(calibration) if calibration is not None else None

    @property
    def threshold(self) -> torch.Tensor:
        return self.table.threshold

    def input_names(self) -> list[str]:
        return (["numeric"] if self.has_numeric else []) + (["onehot"] if self.has_onehot else [])

    def features(self, *inputs: torch.Tensor) -> torch.Tensor:
        """The VAE's input features, [rows, features]: scaled numbers, missing indicators, one-hot."""
        return self._features(inputs, by_column=False)

    def components(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-row score, recon and kl.

        Traced for ONNX, the per-column steps (imputation, scaling, the recon weights) run on the
        transposed block [features, rows]. onnxruntime applies a per-column vector along a narrow
        last axis one row at a time: on 8 columns and 6,800 rows a multiply took 62 us that way
        against 9 us transposed, and these steps were a fifth of the scorer's time. The encoder
        reads the block through its first Gemm's transA. torch eager is the other way round (the
        row layout 1.3x faster), so it keeps rows. Both give the same numbers up to the rounding
        of the recon sum, and each export checks the ONNX scorer against the eager one.
        """
        if not torch.onnx.is_in_onnx_export():
            x = self.features(*inputs)
            mu, logvar = self.vae.encoder(x)
            recon, kl = score_components(x, self.vae.decoder(mu), mu, logvar, self.vae.decoder.bounded_log_scale())
            return recon + self.kl_weight * kl, recon, kl
        columns = self._features(inputs, by_column=True)
        mu, logvar = self.vae.encoder(columns.T)
        log_scale = self.vae.decoder.bounded_log_scale()
        recon = error_map(columns, self.vae.decoder(mu).T, log_scale[:, None]).sum(dim=0)
        kl = kl_divergence(mu, logvar)
        return recon + self.kl_weight * kl, recon, kl

    def _features(self, inputs: tuple[torch.Tensor, ...], by_column: bool) -> torch.Tensor:
        """[rows, features], or [features, rows] when ``by_column``."""
        parts = []
        rest = list(inputs)
        axis = 0 if by_column else 1
        if self.has_numeric:
            numeric, median, scale = rest.pop(0), self.median, self.scale
            if by_column:
                numeric, median, scale = numeric.T, median[:, None], scale[:, None]
            missing = torch.isnan(numeric)
            filled = torch.where(missing, median, numeric)
            parts += [(filled - median) / scale, missing.index_select(axis, self.indicator_index).to(torch.float32)]
        if self.has_onehot:
            onehot = rest.pop(0)
            parts.append(onehot.T if by_column else onehot)
        return torch.cat(parts, dim=axis)

    def forward(self, *inputs: torch.Tensor):
        score, recon, kl = self.components(*inputs)
        score, p_value, is_anomaly = self.table(score)
        return score, recon, kl, p_value, is_anomaly


class ImageScorerGraph(nn.Module):
    """Preprocessed images [B, C, H, W] in [0, 1] -> score, recon, kl, p_value, is_anomaly,
    the per-pixel anomaly map [B, H, W] (recon's share of each pixel, summed over channels) and
    the reconstruction. Resizing and mode conversion happen before the graph, in
    pipeline.images, exactly as the manifest's ``image`` section says."""

    def __init__(self, vae: ConvVAE, kl_weight: float, calibration: Calibration | None = None):
        super().__init__()
        self.vae = vae
        self.kl_weight = float(kl_weight)
        self.table = CalibrationTable(calibration) if calibration is not None else None

    @property
    def threshold(self) -> torch.Tensor:
        return self.table.threshold

    def components(self, images: torch.Tensor):
        mu, logvar = self.vae.encoder(images)
        reconstruction = self.vae.decoder(mu)
        log_scale = self.vae.decoder.bounded_log_scale()
        recon, kl = score_components(images, reconstruction, mu, logvar, log_scale)
        pixel_map = error_map(images, reconstruction, log_scale).sum(dim=1)
        return recon + self.kl_weight * kl, recon, kl, pixel_map, reconstruction

    def forward(self, images: torch.Tensor):
        score, recon, kl, pixel_map, reconstruction = self.components(images)
        score, p_value, is_anomaly = self.table(score)
        return score, recon, kl, p_value, is_anomaly, pixel_map, reconstruction


def graph_inputs(pre: Preprocessor, frame: pd.DataFrame, source: str) -> tuple[torch.Tensor, ...]:
    """The raw inputs ScorerGraph takes (numeric with NaN, one-hot block) for rows of a table."""
    inputs = []
    if pre.numeric:
        inputs.append(torch.from_numpy(numeric_matrix(frame, pre.numeric_columns, source)))
    if pre.categorical:
        block = pre.onehot_block(categorical_strings(frame, pre.categorical_columns), len(frame))
        inputs.append(torch.from_numpy(block))
    return tuple(inputs)
