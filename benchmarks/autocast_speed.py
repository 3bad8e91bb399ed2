"""bf16 autocast against fp32 when training the image VAE on CUDA, by image size.

    python -m benchmarks.autocast_speed

Needs torch with a CUDA GPU. For 28x28 grey (10,000 strokes), 64x64 grey and 64x64 RGB
(6,000 each; RGB stacks a stroke image with two shifted copies), it trains the ConvVAE of
pipeline.image_model for 2 epochs in each mode, in turns, twice, and keeps each mode's best
seconds per epoch (10% held out for validation, as a training run does). This is the
comparison behind ``training.mixed_precision: auto`` being fp32 (pipeline.train.autocast_dtype;
BENCHMARKS.md, "GPU").
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

CASES = ((28, 1, 10_000), (64, 1, 6000), (64, 3, 6000))  # (size, channels, images)


def main(argv: list[str] | None = None) -> int:
    # No options: parsed all the same, so that --help explains the run instead of starting it.
    argparse.ArgumentParser(prog="python -m benchmarks.autocast_speed", description=__doc__.split("\n\n")[0],
                            epilog="Needs torch with a CUDA GPU; prints one JSON line per case, then all of them."
                            ).parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("benchmarks.autocast_speed needs torch with a CUDA GPU; none here", file=sys.stderr)
        return 2
    from benchmarks.image_epoch import make_strokes
    from pipeline.config import ModelConfig, TrainingConfig
    from pipeline.image_model import ConvVAE
    from pipeline.train import train_vae

    results = []
    for size, channels, count in CASES:
        images = make_strokes(count, size)
        if channels == 3:
            images = np.ascontiguousarray(np.concatenate([images, np.roll(images, 3, axis=3),
                                                          np.roll(images, 3, axis=2)], axis=1))
        n_val = count // 10
        best = {}
        for _ in range(2):
            for mode in ("fp32", "bf16"):
                config = TrainingConfig(max_epochs=2, patience=2, progress=False, device="cuda", mixed_precision=mode,
                                        threads=4)
                run = train_vae(images[n_val:], images[:n_val], ModelConfig(), config,
                                build=lambda: ConvVAE(channels, size, 16))
                best[mode] = min(best.get(mode, float("inf")), run.seconds / len(run.history))
        results.append({"size": size, "channels": channels, "images": count - n_val,
                        "fp32_s_per_epoch": round(best["fp32"], 3), "bf16_s_per_epoch": round(best["bf16"], 3),
                        "bf16_over_fp32_speed": round(best["fp32"] / best["bf16"], 2)})
        print(json.dumps(results[-1]), flush=True)
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
