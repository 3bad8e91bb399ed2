"""Prefect flows around the pipeline library. They orchestrate; the logic lives in pipeline/."""

import os

# Telemetry off before Prefect is imported by any flow module.
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# Inside flows, Prefect's run logs tell the progress; terminal progress bars would garble them.
os.environ.setdefault("VAEGUARD_PROGRESS", "0")
