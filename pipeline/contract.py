"""Names and versions fixed by the bundle contract, shared by the exporter and the runtime.

Kept apart from the export code so scoring never imports torch.
"""

OPSET = 17
ML_OPSET = 3  # ai.onnx.ml, for the string one-hot encoder
# onnx 1.23 writes IR 14 by default, which onnxruntime 1.31 refuses; 10 is read everywhere.
IR_VERSION = 10
BATCH_AXIS = "batch_size"
OUTPUT_NAMES = ("score", "recon", "kl", "p_value", "is_anomaly")
# Image scorers add the per-pixel error map and the reconstruction (for anomaly-map PNGs).
IMAGE_OUTPUT_NAMES = OUTPUT_NAMES + ("anomaly_map", "reconstruction")
IMAGE_INPUT = "images"


def categorical_input_name(column: str) -> str:
    """scorer.onnx takes one string input per categorical column, named after it."""
    return f"cat_{column}"
