"""The architecture's import rules: the library never needs Prefect, scoring never needs torch."""

import subprocess
import sys

LIBRARY = ["config", "tables", "schema", "preprocess", "splits", "model", "train", "calibrate", "scorer_graph",
           "export", "verify", "bundle", "runtime", "batch_score", "workflow", "inspect", "synthetic", "cli",
           "landing", "drift", "unseen", "outputs", "image_model", "images", "image_workflow", "image_score",
           "anomaly_maps", "scoring", "plots", "report_html", "training_report", "scoring_report", "console", "cores"]


def imported_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print(' '.join(sorted(m.split('.')[0] for m in sys.modules)))"
    return set(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.split())


def test_library_never_imports_prefect():
    modules = imported_after("; ".join(f"import pipeline.{name}" for name in LIBRARY))
    assert "prefect" not in modules and "pipeline" in modules


def test_scoring_path_does_not_load_torch():
    modules = imported_after("import pipeline.cli, pipeline.scoring, pipeline.scoring_report, pipeline.runtime")
    assert "torch" not in modules and "onnxruntime" in modules
