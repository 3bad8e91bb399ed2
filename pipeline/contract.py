"""Names and versions fixed by the bundle contract, shared by the exporter and the runtime.

Kept apart from the export code so scoring never imports torch.
"""

OPSET = 17
ML_OPSET = 3  # ai.onnx.ml, for the string one-hot encoder and the LabelEncoder of boolean and integer-coded columns
# onnx 1.23 writes IR 14 by default, which onnxruntime 1.31 refuses; 10 is read everywhere.
IR_VERSION = 10
BATCH_AXIS = "batch_size"
OUTPUT_NAMES = ("score", "recon", "kl", "p_value", "is_anomaly")
# The column that names each row's input when one scores file holds several inputs.
SOURCE_COLUMN = "source"
# Image scorers add the per-pixel error map and the reconstruction (for anomaly-map PNGs).
IMAGE_OUTPUT_NAMES = OUTPUT_NAMES + ("anomaly_map", "reconstruction")
IMAGE_INPUT = "images"

# The CUDA provider's defaults trade exactness for speed. use_tf32 (on by default) runs float32
# MatMul and Conv on tensor cores with a 10-bit mantissa: on an H100 that moved the test suite's
# tabular scores by up to 0.9% against the CPU, and flipped 2 decisions in 200,000 rows of another
# bundle; without it they agree to 1e-5 or better. The default cuDNN search times the candidate
# convolution algorithms when a session first runs and keeps the fastest, so which algorithm
# runs, and the last bits of an image's score, depend on timing; the heuristic picks without
# timing. On 16,384-image batches it ran at 0.69x the timed choice's rate, still about 60 times
# the CPU's. BENCHMARKS.md, "GPU", has the figures. Every manifest carries both dicts
# (onnx.cuda_provider_options, onnx.cuda_session_options) for other runtimes to apply.
CUDA_PROVIDER_OPTIONS = {"use_tf32": "0", "cudnn_conv_algo_search": "HEURISTIC"}
CUDA_SESSION_OPTIONS = {"use_deterministic_compute": True}


def cuda_settings() -> dict:
    """The manifest's onnx entries that tell other runtimes how vaeguard opens a CUDA session."""
    return {"cuda_provider_options": dict(CUDA_PROVIDER_OPTIONS), "cuda_session_options": dict(CUDA_SESSION_OPTIONS)}


def categorical_input_name(column: str) -> str:
    """scorer.onnx takes one string input per categorical column, named after it."""
    return f"cat_{column}"
