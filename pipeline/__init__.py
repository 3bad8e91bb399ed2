"""vaeguard: VAE anomaly detection for tables, exported to ONNX and scored with onnxruntime.

The library never imports Prefect; flows/ wraps it. Read in this order: config, tables,
schema, preprocess, splits, model, train, calibrate, scorer_graph, export, verify, bundle,
runtime, batch_score, workflow, cli.
"""

import os

# Must be set before torch loads its OpenMP runtime: with the default (active) wait policy,
# torch's threads spin while another process holds a core, and training inside a Prefect
# flow (whose local server is such a process) ran 25x slower on 2 cores.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
