"""Seconds per training epoch of the convolutional VAE, against the tabular MLP VAE on the same pixels.

    python -m benchmarks.image_epoch [--images 10000] [--size 28] [--epochs 3]

Generates digit-like grayscale images (2 to 4 random pen strokes: lines, arcs and loops, drawn
at twice the size and downsampled for soft edges; no downloads), holds out 10% for validation
as the training run does, and trains for a fixed number of epochs (patience = epochs, so no
early stop) with pipeline.train.train_vae:
- the ConvVAE of pipeline.image_model on [N, 1, size, size];
- as a same-run baseline, the tabular MLP VAE (default layer sizes) on the same pixels
  flattened to an [N, size * size] float table.
An epoch is one pass over the training images plus the validation pass, as in a real run.
Prints one JSON object; ``conv_over_mlp`` is the ratio of seconds per epoch.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np
import torch
from PIL import Image, ImageDraw

from pipeline.config import ModelConfig, TrainingConfig
from pipeline.image_model import ConvVAE
from pipeline.image_workflow import DEFAULT_LATENT
from pipeline.model import default_layer_sizes
from pipeline.train import train_vae


def make_strokes(n: int, size: int, seed: int = 0) -> np.ndarray:
    """[n, 1, size, size] float32 in [0, 1]: white pen strokes on black, like handwritten digits."""
    rng = np.random.default_rng(seed)
    big = 2 * size
    margin = big * 0.2
    out = np.empty((n, 1, size, size), dtype=np.float32)
    for i in range(n):
        canvas = Image.new("L", (big, big), 0)
        draw = ImageDraw.Draw(canvas)
        width = int(rng.integers(3, 6))
        for _ in range(int(rng.integers(2, 5))):
            kind = rng.integers(3)
            if kind == 0:  # a straight stroke
                points = [tuple(p) for p in rng.uniform(margin, big - margin, size=(2, 2))]
                draw.line(points, fill=255, width=width)
            elif kind == 1:  # an arc of a circle
                cx, cy = rng.uniform(big * 0.35, big * 0.65, size=2)
                r = rng.uniform(big * 0.12, big * 0.3)
                start = rng.uniform(0, 360)
                draw.arc([cx - r, cy - r, cx + r, cy + r], start, start + rng.uniform(90, 300), fill=255,
                         width=width)
            else:  # a closed loop
                cx, cy = rng.uniform(big * 0.35, big * 0.65, size=2)
                rx, ry = rng.uniform(big * 0.08, big * 0.2, size=2)
                draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], outline=255, width=width)
        small = canvas.resize((size, size), Image.Resampling.BILINEAR)
        out[i, 0] = np.asarray(small, dtype=np.float32) / 255.0
    return out


def timed_training(train_x: np.ndarray, val_x: np.ndarray, config: TrainingConfig, build=None) -> dict:
    result = train_vae(train_x, val_x, ModelConfig(), config, build=build)
    epochs = len(result.history)
    per_epoch = result.seconds / epochs
    return {"epochs": epochs, "seconds": round(result.seconds, 3), "seconds_per_epoch": round(per_epoch, 3),
            "images_per_second": round(len(train_x) / per_epoch, 1), "device": result.device,
            "parameters": sum(p.numel() for p in result.model.parameters()),
            "final_val_loss": round(result.history[-1]["val_loss"], 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--size", type=int, default=28)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    args = parser.parse_args()

    started = time.perf_counter()
    images = make_strokes(args.images, args.size)
    generate_seconds = time.perf_counter() - started
    n_val = max(1, round(0.1 * args.images))
    order = np.random.default_rng(1).permutation(args.images)
    train_x, val_x = images[order[n_val:]], images[order[:n_val]]
    config = TrainingConfig(max_epochs=args.epochs, patience=args.epochs, threads=args.threads,
                            batch_size=args.batch_size, device=args.device, progress=False)

    conv = timed_training(train_x, val_x, config,
                          build=lambda: ConvVAE(1, args.size, DEFAULT_LATENT))
    threads = torch.get_num_threads()  # as train_vae set it
    flat = args.size * args.size
    mlp = timed_training(train_x.reshape(len(train_x), flat), val_x.reshape(len(val_x), flat), config)
    hidden, latent = default_layer_sizes(flat)

    print(json.dumps({
        "images": args.images, "train_images": len(train_x), "val_images": len(val_x),
        "size": args.size, "channels": 1, "batch_size": args.batch_size, "epochs": args.epochs,
        "torch_threads": threads, "device": conv["device"], "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(), "generate_seconds": round(generate_seconds, 2),
        "conv_vae": {"model": f"ConvVAE 1x{args.size}x{args.size}, latent {DEFAULT_LATENT}", **conv},
        "mlp_vae": {"model": f"MLP VAE {flat} -> {list(hidden)} -> latent {latent}", **mlp},
        "conv_over_mlp": round(conv["seconds_per_epoch"] / mlp["seconds_per_epoch"], 2),
    }, indent=2))


if __name__ == "__main__":
    main()
