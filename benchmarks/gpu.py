"""GPU against CPU: scorer throughput by batch size and training time, environment first.

    python -m benchmarks.gpu --out runs/bench/gpu.json [--quick] [--threads N] [--bundle DIR]
                             [--cuda-lib-dir DIR ...]

Run from the repository root with the project's .venv, or with any Python that has its packages.
1. The environment, printed before anything heavy is imported: onnxruntime's version, CUDA build
   and providers (``get_available_providers()``, ``get_device()``), whether its CUDA provider
   really starts and, if not, which CUDA 13 / cuDNN 9 libraries are missing (and where on this
   machine copies of them lie: ``--cuda-lib-dir`` loads them from there), torch and its CUDA,
   the GPU (torch, else nvidia-smi) and library versions.
2. Training time, CUDA against CPU, on the same data for a fixed number of epochs (patience =
   epochs, so no early stop), after an untimed warm-up: the tabular MLP VAE end to end
   (``run_training``) on a generated sensor table, and the image VAE (``train_vae`` on generated
   pen strokes, as benchmarks.image_epoch) on CUDA in fp32 and in bf16 autocast; and the MLP
   alone (``train_vae``) on Gaussian tables of several widths, where the GPU's share changes.
3. Scoring throughput in rows/s, best of several repeats after a warm-up, by batch size, for what
   vaeguard does (``BundleScorer``: a plain ``session.run`` on host arrays) against IO binding,
   the alternative it measured and dropped (``io_bound`` below):
   - the tabular scorer.onnx: CPU, CUDA through ``BundleScorer``, CUDA with the numeric block
     handed over as a GPU OrtValue (onnxruntime's Python IOBinding cannot bind the string
     inputs of categorical columns), and the fp16 variant on CUDA when pipeline.precision can
     make one (on a copy of the bundle);
   - the image scorer (one float input): CPU, CUDA through ``session.run``, and IO-bound CUDA
     with the outputs bound to the host, or to the GPU and copied after.
4. Whether CUDA and the CPU agree: the largest relative score difference, decisions that differ,
   and whether a second CUDA session repeats the first exactly.
5. A CSV file to Parquet scores (``score_files``, as `vaeguard score` runs) on the CPU and on
   CUDA, against the streaming parse of the same file: whether moving onnxruntime's work to the
   GPU brings file scoring closer to the parse.
Without CUDA the CPU parts run and the GPU rows are skipped, saying why. Writes one JSON file
and prints markdown tables. ``--quick``: small sizes, a couple of minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import glob
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
import traceback
from pathlib import Path

PACKAGES = ("onnxruntime-gpu", "onnxruntime", "torch", "onnx", "numpy", "pandas", "pyarrow", "nvidia-cudnn-cu13",
            "nvidia-cublas", "nvidia-cuda-runtime", "nvidia-curand", "nvidia-cufft")
# Loaded in dependency order when --cuda-lib-dir is given (cublas needs cublasLt, both cudart).
LIBRARY_ORDER = ("libcudart.so.13", "libcublasLt.so.13", "libcublas.so.13", "libcurand.so.10", "libcufft.so.12",
                 "libcudnn.so.9")
LIBRARY_ROOTS = ("{purelib}/nvidia/*/lib", "{platlib}/nvidia/*/lib", "/usr/local/lib/python3*/*-packages/nvidia/*/lib",
                 "/usr/lib/python3/dist-packages/nvidia/*/lib", "/usr/local/cuda*/lib*",
                 "/usr/local/cuda*/targets/*/lib", "/usr/lib/x86_64-linux-gnu", "/opt/conda/lib")
NO_CUDA = "no CUDA: GPU rows skipped"

SIZES = {
    # train_rows: the sensor table for the tabular runs; images at 28x28 for the image VAE.
    "full": {"train_rows": 100_000, "epochs": 20, "images": 10_000, "image_epochs": 3, "repeats": 5,
             "file_rows": 1_000_000,
             "widths": (8, 64, 256, 1024), "width_rows": 50_000, "width_epochs": 3,
             "batches": (1024, 8192, 65_536, 262_144, 1_048_576), "image_batches": (256, 1024, 4096, 16_384)},
    "quick": {"train_rows": 4000, "epochs": 3, "images": 600, "image_epochs": 1, "repeats": 3,
              "file_rows": 20_000,
              "widths": (8, 64), "width_rows": 2000, "width_epochs": 1,
              "batches": (1024, 8192, 65_536), "image_batches": (64, 256)},
}


def timed(work) -> tuple[float, object]:
    """benchmarks.speed.timed, repeated here: importing speed.py would import torch and pandas before
    the environment is printed, and this report must come out even where they are missing."""
    started = time.perf_counter()
    result = work()
    return time.perf_counter() - started, result


def one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def attempt(notes: list[str], what: str, work):
    """Run one part; on failure note why (one line) and go on with the others."""
    try:
        return work()
    except Exception as exc:  # noqa: BLE001 - a benchmark reports what it could not do and goes on
        notes.append(f"{what} skipped: {one_line(exc)}")
        traceback.print_exc(file=sys.stderr)
        return None


# --- 1. the environment ----------------------------------------------------------------------


def version_of(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def nvidia_smi() -> str | None:
    if not shutil.which("nvidia-smi"):
        return None
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30)
        return (done.stdout or done.stderr).strip() or None
    except (OSError, subprocess.SubprocessError) as exc:
        return one_line(exc)


def find_libraries() -> dict[str, list[str]]:
    """Where on this machine the CUDA libraries lie, whether or not the loader would find them."""
    paths = sysconfig.get_paths()
    found: dict[str, list[str]] = {}
    seen = set()
    for root in LIBRARY_ROOTS:
        for folder in sorted(glob.glob(root.format(purelib=paths["purelib"], platlib=paths["platlib"]))):
            if os.path.realpath(folder) in seen:  # /usr/local/cuda -> cuda-13.0, lib64 -> lib
                continue
            seen.add(os.path.realpath(folder))
            for name in LIBRARY_ORDER:
                if os.path.exists(os.path.join(folder, name)):
                    found.setdefault(name, []).append(folder)
    return found


def load_from(folders: list[str]) -> list[str]:
    """Load the CUDA libraries of ``folders`` into the process (RTLD_GLOBAL), as preload_dlls does."""
    loaded = []
    for name in LIBRARY_ORDER:
        for folder in folders:
            path = os.path.join(folder, name)
            if os.path.exists(path):
                with contextlib.suppress(OSError):
                    ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
                    loaded.append(path)
                    break
    return loaded


def environment(cuda_lib_dirs: list[str]) -> dict:
    env: dict = {"python": sys.version.split()[0], "executable": sys.executable, "platform": platform.platform(),
                 "cpu": cpu_name(), "cpu_count": os.cpu_count(),
                 "packages": {name: v for name in PACKAGES if (v := version_of(name))},
                 "nvidia_smi": nvidia_smi(), "cuda_libraries_on_disk": find_libraries()}
    if cuda_lib_dirs:
        env["loaded_from_cuda_lib_dir"] = load_from(cuda_lib_dirs)
    try:
        import onnxruntime as ort

        build = getattr(getattr(ort.capi, "build_and_package_info", None), "cuda_version", None)
        env["onnxruntime"] = {"version": ort.__version__, "cuda_build": build, "device": ort.get_device(),
                              "providers": ort.get_available_providers()}
    except Exception as exc:  # noqa: BLE001
        env["onnxruntime"] = {"error": one_line(exc)}
    try:
        import torch

        cuda = torch.cuda.is_available()
        env["torch"] = {"version": torch.__version__, "cuda_build": torch.version.cuda, "cuda_available": cuda}
        if cuda:
            env["torch"] |= {"gpu": torch.cuda.get_device_name(0),
                             "capability": list(torch.cuda.get_device_capability(0)),
                             "bf16": torch.cuda.is_bf16_supported(), "cudnn": torch.backends.cudnn.version()}
    except Exception as exc:  # noqa: BLE001
        env["torch"] = {"error": one_line(exc)}
    env["gpu"] = env.get("torch", {}).get("gpu") or env["nvidia_smi"]
    try:
        from pipeline import cuda_libraries, runtime

        cuda_libraries.preload_cuda_libraries()
        env["driver_loaded"] = runtime.gpu_present()
        env["cuda_libraries_missing"] = cuda_libraries.missing_cuda_libraries()
        env["onnxruntime_cuda"] = cuda_provider_check(runtime)
    except Exception as exc:  # noqa: BLE001
        env["onnxruntime_cuda"] = {"active": False, "why": one_line(exc)}
    return env


def cuda_provider_check(runtime) -> dict:
    """Whether onnxruntime's CUDA provider really starts, on a one-node graph."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n"])
    model = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "probe", [x], [y]),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "probe.onnx"
        onnx.save(model, path)
        try:
            session = runtime.create_session(path, "cuda")
        except runtime.DeviceError as exc:
            return {"active": False, "why": str(exc)}
        session.run(["y"], {"x": np.ones(4, np.float32)})
        return {"active": True, "providers": session.get_providers()}


# --- 2. training ----------------------------------------------------------------------------


def torch_cuda() -> bool:
    with contextlib.suppress(Exception):
        import torch

        return torch.cuda.is_available()
    return False


def warm_up_cuda() -> None:
    """Create the CUDA context, cuBLAS and cuDNN handles outside any timing."""
    import numpy as np

    from pipeline.config import ModelConfig, TrainingConfig
    from pipeline.image_model import ConvVAE
    from pipeline.train import train_vae

    config = TrainingConfig(max_epochs=1, patience=1, progress=False, device="cuda", batch_size=32)
    images = np.random.default_rng(0).random((64, 1, 28, 28), dtype=np.float32)
    train_vae(images, images[:8], ModelConfig(), config, build=lambda: ConvVAE(1, 28, 16))
    train_vae(images.reshape(64, -1)[:, :20], images.reshape(64, -1)[:8, :20], ModelConfig(), config)


def train_tabular(work: Path, rows: int, epochs: int, devices: list[str], threads: int | None) -> list[dict]:
    from pipeline.config import PipelineConfig, TrainingConfig, TrainJob
    from pipeline.synthetic import SyntheticSpec, make_sensor_table, write_table
    from pipeline.workflow import run_training

    data = write_table(make_sensor_table(SyntheticSpec(n_rows=rows, seed=0)), work / "train.parquet")
    results = []
    for device in devices:
        config = PipelineConfig(training=TrainingConfig(max_epochs=epochs, patience=epochs, threads=threads,
                                                        progress=False, device=device))
        job = TrainJob(data=data, name=f"tabular-{device}", out_dir=work, id_columns=("row_id",),
                       label_column="label", config=config)
        seconds, facts = timed(lambda: run_training(job))
        train = facts["train_model"]
        results.append({"model": "tabular MLP VAE", "device": device, "mixed_precision": train.get("mixed_precision"),
                        "train_rows": facts["split"]["train"], "epochs": train["epochs"],
                        "batch_size": config.training.batch_size, "train_seconds": train["seconds"],
                        "seconds_per_epoch": round(train["seconds"] / train["epochs"], 3),
                        "end_to_end_seconds": round(seconds, 2), "best_val_loss": round(train["best_val_loss"], 4),
                        "auroc": facts["calibrate_threshold"].get("auroc"), "bundle": facts["bundle"]})
    return results


def train_widths(widths: tuple[int, ...], rows: int, epochs: int, devices: list[str],
                 threads: int | None) -> list[dict]:
    """The tabular MLP on Gaussian rows of each width: where, if anywhere, CUDA beats the CPU.

    The network's width follows the number of features (pipeline.model.default_layer_sizes), so
    the sensor table (8 numeric and 2 categorical columns) says little about a table with hundreds
    of one-hot columns.
    """
    import numpy as np

    from pipeline.config import ModelConfig, TrainingConfig
    from pipeline.train import train_vae

    results = []
    for width in widths:
        data = np.random.default_rng(width).normal(size=(rows, width)).astype(np.float32)
        n_val = rows // 10
        for device in devices:
            config = TrainingConfig(max_epochs=epochs, patience=epochs, threads=threads, progress=False, device=device)
            result = train_vae(data[n_val:], data[:n_val], ModelConfig(), config)
            per_epoch = result.seconds / len(result.history)
            results.append({"model": f"tabular MLP VAE, {width} features", "device": device,
                            "mixed_precision": result.mixed_precision, "train_rows": rows - n_val,
                            "epochs": len(result.history), "batch_size": config.batch_size,
                            "train_seconds": round(result.seconds, 3), "seconds_per_epoch": round(per_epoch, 3),
                            "final_val_loss": round(float(result.history[-1]["val_loss"]), 4)})
    return results


def train_images(count: int, epochs: int, runs: list[tuple[str, str]], threads: int | None) -> list[dict]:
    import numpy as np

    from benchmarks.image_epoch import make_strokes
    from pipeline.config import ModelConfig, TrainingConfig
    from pipeline.image_model import ConvVAE
    from pipeline.image_workflow import DEFAULT_LATENT
    from pipeline.train import train_vae

    size = 28
    images = make_strokes(count, size)
    n_val = max(1, count // 10)
    results = []
    for device, mode in runs:
        config = TrainingConfig(max_epochs=epochs, patience=epochs, threads=threads, progress=False, device=device,
                                mixed_precision=mode)
        result = train_vae(images[n_val:], images[:n_val], ModelConfig(), config,
                           build=lambda: ConvVAE(1, size, DEFAULT_LATENT))
        per_epoch = result.seconds / len(result.history)
        results.append({"model": f"image ConvVAE 1x{size}x{size}", "device": device,
                        "mixed_precision": result.mixed_precision, "train_rows": count - n_val,
                        "epochs": len(result.history), "batch_size": config.batch_size,
                        "train_seconds": round(result.seconds, 3), "seconds_per_epoch": round(per_epoch, 3),
                        "images_per_s": round((count - n_val) / per_epoch, 1),
                        "final_val_loss": round(float(np.float64(result.history[-1]["val_loss"])), 4)})
    return results


# --- 3. scoring -----------------------------------------------------------------------------


def best_rates(methods: dict, batches: tuple[int, ...], repeats: int) -> dict[str, dict[int, float]]:
    """Rows/s of each method by batch size: one warm-up call, then the best of ``repeats``,
    interleaved so that a busy neighbour slows every method alike."""
    rates: dict[str, dict[int, float]] = {name: {} for name in methods}
    for rows in batches:
        best = dict.fromkeys(methods, float("inf"))
        for run in methods.values():
            run(rows)
        for _ in range(repeats):
            for name, run in methods.items():
                seconds, _ = timed(lambda: run(rows))
                best[name] = min(best[name], seconds)
        for name in methods:
            rates[name][rows] = round(rows / best[name])
    return rates


def agreement(cpu_scores, cuda_scores, threshold: float) -> dict:
    """CUDA's scores against the CPU's: ``cuda_scores()`` is called twice, each time in a new session."""
    import numpy as np

    cpu, first, second = cpu_scores(), cuda_scores(), cuda_scores()
    relative = np.abs(first - cpu) / np.maximum(np.abs(cpu), 1e-6)
    return {"rows": len(cpu), "max_relative_difference": float(relative.max()),
            "decisions_differ": int(((first > threshold) != (cpu > threshold)).sum()),
            "cuda_repeats_exactly": bool(np.array_equal(first, second))}


def io_bound(session, feeds: dict, output_names: list[str], outputs_on: str = "cpu") -> list:
    """``session.run`` through IO binding: float inputs copied to the GPU as OrtValues, string
    inputs (which IOBinding cannot bind) passed to a plain run next to them."""
    import numpy as np
    import onnxruntime as ort

    inputs = {name: value if value.dtype.kind in "OSU"
              else ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value), "cuda", 0)
              for name, value in feeds.items()}
    if any(not isinstance(value, ort.OrtValue) for value in inputs.values()):
        return session.run(output_names, inputs)
    binding = session.io_binding()
    for name, value in inputs.items():
        binding.bind_ortvalue_input(name, value)
    for name in output_names:
        binding.bind_output(name, outputs_on)
    session.run_with_iobinding(binding)
    return binding.copy_outputs_to_cpu()


def table_methods(bundle_path: Path, work: Path, rows: int, threads: int | None, cuda: bool, notes: list[str],
                  agree: dict) -> dict:
    import numpy as np

    from pipeline.bundle import Bundle
    from pipeline.contract import OUTPUT_NAMES, categorical_input_name
    from pipeline.runtime import BundleScorer
    from pipeline.schema import categorical_strings, numeric_matrix
    from pipeline.synthetic import SyntheticSpec, make_sensor_table

    bundle = Bundle.load(bundle_path)
    frame = make_sensor_table(SyntheticSpec(n_rows=rows, seed=1))
    cpu = BundleScorer(bundle, device="cpu", threads=threads)
    numeric = np.ascontiguousarray(numeric_matrix(frame, cpu.numeric_columns, "generated"), dtype=np.float32)
    categories = categorical_strings(frame, cpu.categorical_columns)
    del frame

    def with_scorer(scorer):
        return lambda n: scorer.score_arrays(numeric[:n], [c[:n] for c in categories])

    methods = {"cpu": with_scorer(cpu)}
    if not cuda:
        return methods
    gpu = BundleScorer(bundle, device="cuda", threads=threads)
    agree["tabular"] = agreement(lambda: cpu.score_arrays(numeric, categories)["score"],
                                 lambda: BundleScorer(bundle, "cuda", threads).score_arrays(numeric, categories)["score"],
                                 bundle.manifest["calibration"]["threshold"])
    methods["cuda (BundleScorer)"] = with_scorer(gpu)

    def bound(n):
        feeds = {"numeric": numeric[:n]} | {categorical_input_name(c): v[:n]
                                             for c, v in zip(gpu.categorical_columns, categories)}
        return io_bound(gpu.session, feeds, list(OUTPUT_NAMES))

    methods["cuda (numeric block as a GPU OrtValue)"] = bound
    try:
        from pipeline.precision import export_variant
    except ImportError as exc:
        notes.append(f"fp16 variant skipped: pipeline.precision is not there ({one_line(exc)})")
        return methods

    def fp16():
        copy = shutil.copytree(bundle.path, work / f"{bundle.path.name}-fp16")  # never change the user's bundle
        export_variant(copy, "fp16", device="cuda", threads=threads)
        return BundleScorer(Bundle.load(copy), device="cuda", threads=threads, precision="fp16")

    if (half := attempt(notes, "fp16 variant on CUDA", fp16)) is not None:
        methods["cuda fp16 (BundleScorer)"] = with_scorer(half)
    return methods


def image_methods(work: Path, count: int, rows: int, threads: int | None, cuda: bool, agree: dict) -> dict:
    import numpy as np

    from benchmarks.image_epoch import make_strokes
    from pipeline.config import CalibrationConfig, ImageTrainJob, PipelineConfig, TrainingConfig
    from pipeline.contract import IMAGE_INPUT, IMAGE_OUTPUT_NAMES
    from pipeline.image_workflow import run_image_training
    from pipeline.runtime import create_session

    np.save(work / "strokes.npy", make_strokes(count, 28, seed=2)[:, 0])
    config = PipelineConfig(training=TrainingConfig(max_epochs=2, patience=2, threads=threads, progress=False),
                            calibration=CalibrationConfig(target_fpr=0.05))
    facts = run_image_training(ImageTrainJob(data=work / "strokes.npy", name="images", out_dir=work, image_size=28,
                                             channels=1, config=config))
    scorer = Path(facts["bundle"]) / "scorer.onnx"
    images = make_strokes(min(rows, 2048), 28, seed=3)
    images = np.ascontiguousarray(np.resize(images, (rows, 1, 28, 28)))
    names = list(IMAGE_OUTPUT_NAMES)
    cpu = create_session(scorer, "cpu", threads)
    methods = {"cpu": lambda n: cpu.run(names, {IMAGE_INPUT: images[:n]})}
    if cuda:
        gpu = create_session(scorer, "cuda", threads)
        score_index = names.index("score")
        agree["image"] = agreement(lambda: cpu.run(names, {IMAGE_INPUT: images})[score_index],
                                   lambda: create_session(scorer, "cuda", threads).run(
                                       names, {IMAGE_INPUT: images})[score_index],
                                   json.loads((scorer.parent / "manifest.json").read_text())["calibration"]["threshold"])
        methods["cuda (session.run)"] = lambda n: gpu.run(names, {IMAGE_INPUT: images[:n]})
        methods["cuda (IO-bound, outputs to host)"] = lambda n: io_bound(gpu, {IMAGE_INPUT: images[:n]}, names)
        methods["cuda (IO-bound, outputs on GPU, copied)"] = lambda n: io_bound(gpu, {IMAGE_INPUT: images[:n]}, names,
                                                                                "cuda")
    return methods


def file_scoring(bundle_path: Path, work: Path, rows: int, repeats: int, cuda: bool) -> dict:
    """Rows/s of a CSV file to Parquet scores on each device and of its streaming parse, best of
    ``repeats`` taken in turns, and each device's ratio to the parse."""
    from benchmarks.speed import best_in_turns
    from pipeline.batch_score import score_files
    from pipeline.bundle import Bundle
    from pipeline.config import ScoreJob
    from pipeline.synthetic import SyntheticSpec, make_sensor_table, write_table
    from pipeline.tables import iter_batches

    schema = Bundle.load(bundle_path).schema
    path = write_table(make_sensor_table(SyntheticSpec(n_rows=rows, seed=4)), work / "file-scoring.csv")
    works = {"parse": lambda: sum(b.num_rows for b in iter_batches(path, list(schema.numeric), list(schema.categorical),
                                                                   list(schema.id_columns), 65_536))}
    for device in ("cpu", "cuda") if cuda else ("cpu",):
        works[device] = lambda device=device: score_files(ScoreJob(bundle_path, (path,), work / f"{device}.parquet",
                                                                   device=device))
    best, _ = best_in_turns(works, repeats)
    result = {"rows": rows, "repeats": repeats} | {f"{name}_rows_per_s": round(rows / s) for name, s in best.items()}
    return result | {f"{device}_over_parse": round(best["parse"] / best[device], 3) for device in works if device != "parse"}


# --- output ---------------------------------------------------------------------------------


def torch_line(facts: dict) -> str:
    if "version" not in facts:
        return f"not importable: {facts.get('error')}"
    return f"{facts['version']}, CUDA build {facts['cuda_build']}, CUDA available: {facts['cuda_available']}"


def markdown(result: dict) -> str:
    env = result["environment"]
    ort_cuda, ort_env = env.get("onnxruntime_cuda", {}), env.get("onnxruntime", {})
    lines = ["## Environment", "", "| fact | value |", "|---|---|",
             f"| GPU | {env.get('gpu') or 'none'} |", f"| CPU | {env['cpu']} ({env['cpu_count']} cores) |",
             f"| onnxruntime | {ort_env.get('version')} (CUDA build {ort_env.get('cuda_build')}), providers "
             f"{', '.join(ort_env.get('providers', []))}, device {ort_env.get('device')} |",
             "| onnxruntime CUDA provider | "
             f"{'active' if ort_cuda.get('active') else 'not active: ' + str(ort_cuda.get('why'))} |",
             f"| torch | {torch_line(env.get('torch', {}))} |", ""]
    if result["training"]:
        lines += ["## Training (fixed epochs, no early stop)", "",
                  "| model | device | precision | train rows | epochs | batch | s/epoch | train s | quality |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in result["training"]:
            quality = (f"AUROC {r['auroc']:.4f}" if r.get("auroc") is not None
                       else f"val loss {r.get('final_val_loss')}")
            lines.append(f"| {r['model']} | {r['device']} | {r['mixed_precision']} | {r['train_rows']:,} "
                         f"| {r['epochs']} | {r['batch_size']} | {r['seconds_per_epoch']} | {r['train_seconds']} "
                         f"| {quality} |")
        lines.append("")
    for title, key, unit in (("Tabular scorer.onnx", "scoring_table", "rows/s"),
                             ("Image scorer.onnx (28x28)", "scoring_images", "images/s")):
        rates = result.get(key)
        if not rates:
            continue
        methods = list(rates)
        batches = list(next(iter(rates.values())))
        lines += [f"## {title}: {unit}, best of {result['repeats']}", "",
                  "| batch | " + " | ".join(methods) + (" | vaeguard's cuda / cpu |" if len(methods) > 1 else " |"),
                  "|---" * (len(methods) + 1 + (len(methods) > 1)) + "|"]
        for rows in batches:
            cells = [f"{rates[m][rows]:,}" for m in methods]
            ratio = (f" | {rates[methods[1]][rows] / rates['cpu'][rows]:.2f}x"
                     if len(methods) > 1 else "")
            lines.append(f"| {int(rows):,} | " + " | ".join(cells) + ratio + " |")
        lines.append("")
    if result.get("file_scoring"):
        f = result["file_scoring"]
        lines += [f"## CSV file to Parquet scores: {f['rows']:,} rows, best of {f['repeats']}", "",
                  "| | rows/s | over the streaming parse |", "|---|---|---|",
                  f"| streaming parse | {f['parse_rows_per_s']:,} | 1.00x |"]
        lines += [f"| `vaeguard score --device {d}` | {f[d + '_rows_per_s']:,} | {f[d + '_over_parse']:.2f}x |"
                  for d in ("cpu", "cuda") if d + "_rows_per_s" in f]
        lines.append("")
    if result.get("agreement"):
        lines += ["## CUDA against the CPU: the same scores?", "",
                  "| scorer | rows | largest relative difference | decisions that differ | a new CUDA session repeats it |",
                  "|---|---|---|---|---|"]
        for name, a in result["agreement"].items():
            lines.append(f"| {name} | {a['rows']:,} | {a['max_relative_difference']:.2e} | {a['decisions_differ']} "
                         f"| {'exactly' if a['cuda_repeats_exactly'] else 'no'} |")
        lines.append("")
    lines += [f"- {note}" for note in result["notes"]]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/bench/gpu.json"))
    parser.add_argument("--quick", action="store_true", help="small sizes: a couple of minutes on 2 CPU cores")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: every core up to 4)")
    parser.add_argument("--bundle", type=Path, default=None,
                        help="score this sensor-table bundle (e.g. exported/demo) instead of the one trained here")
    parser.add_argument("--cuda-lib-dir", action="append", default=[],
                        help="load CUDA 13 / cuDNN 9 libraries from this folder first (repeatable)")
    parser.add_argument("--skip-training", action="store_true", help="only the environment and scoring")
    args = parser.parse_args()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    sizes = SIZES["quick" if args.quick else "full"]

    env = environment(args.cuda_lib_dir)
    print("# Environment\n" + json.dumps(env, indent=2), flush=True)
    ort_cuda = bool(env.get("onnxruntime_cuda", {}).get("active"))
    cuda_train = torch_cuda()
    notes: list[str] = []
    if not ort_cuda:
        notes.append(f"{NO_CUDA} for scoring: {env.get('onnxruntime_cuda', {}).get('why')}")
        on_disk = env["cuda_libraries_on_disk"]
        elsewhere = sorted({on_disk[name][0] for name in env.get("cuda_libraries_missing", []) if name in on_disk})
        if elsewhere:
            notes.append("some missing CUDA libraries lie on this machine: rerun with "
                         + " ".join(f"--cuda-lib-dir {folder}" for folder in elsewhere))
    if not cuda_train:
        torch_env = env.get("torch", {})
        why = (f"torch {torch_env['version']} sees no CUDA device" if "version" in torch_env
               else f"torch cannot be imported ({torch_env.get('error')})")
        notes.append(f"{NO_CUDA} for training: {why}")
    if not (ort_cuda and cuda_train):
        print(NO_CUDA if not (ort_cuda or cuda_train) else "partial CUDA: " + "; ".join(notes), flush=True)

    result = {"mode": "quick" if args.quick else "full", "repeats": sizes["repeats"], "threads": args.threads,
              "environment": env, "training": [], "scoring_table": None, "scoring_images": None, "agreement": {},
              "notes": notes}
    work = Path(tempfile.mkdtemp(prefix="vaeguard-gpu-"))
    try:
        bundle = args.bundle
        if not args.skip_training:
            if cuda_train:
                attempt(notes, "CUDA warm-up", warm_up_cuda)
            devices = ["cpu", "cuda"] if cuda_train else ["cpu"]
            tabular = attempt(notes, "tabular training", lambda: train_tabular(work, sizes["train_rows"], sizes["epochs"],
                                                                               devices, args.threads))
            result["training"] += tabular or []
            result["training"] += attempt(notes, "tabular training by width", lambda: train_widths(
                sizes["widths"], sizes["width_rows"], sizes["width_epochs"], devices, args.threads)) or []
            bundle = bundle or (Path(tabular[0]["bundle"]) if tabular else None)
            runs = [("cpu", "fp32")] + ([("cuda", "fp32"), ("cuda", "bf16")] if cuda_train else [])
            result["training"] += attempt(notes, "image training", lambda: train_images(
                sizes["images"], sizes["image_epochs"], runs, args.threads)) or []
            print(f"training done: {json.dumps(result['training'], indent=2)}", flush=True)
        if bundle is None and Path("exported/demo/manifest.json").is_file():
            bundle = Path("exported/demo")
        if bundle is None:
            notes.append("tabular scoring skipped: no bundle (training failed or skipped; pass --bundle)")
        else:
            methods = attempt(notes, "tabular scoring", lambda: table_methods(bundle, work, max(sizes["batches"]),
                                                                              args.threads, ort_cuda, notes,
                                                                              result["agreement"]))
            if methods:
                result["scoring_table"] = attempt(notes, "tabular scoring",
                                                  lambda: best_rates(methods, sizes["batches"], sizes["repeats"]))
                result["scoring_bundle"] = str(bundle)
            result["file_scoring"] = attempt(notes, "file scoring", lambda: file_scoring(
                bundle, work, sizes["file_rows"], min(sizes["repeats"], 3), ort_cuda))
        if not args.skip_training:
            methods = attempt(notes, "image scoring", lambda: image_methods(work, sizes["images"] // 2,
                                                                            max(sizes["image_batches"]), args.threads,
                                                                            ort_cuda, result["agreement"]))
            if methods:
                result["scoring_images"] = attempt(notes, "image scoring",
                                                   lambda: best_rates(methods, sizes["image_batches"], sizes["repeats"]))

        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
        print("\n" + markdown(result))
        print(f"\nwritten: {args.out}")
    finally:
        shutil.rmtree(work, ignore_errors=True)  # the run's bundles, images and tables


if __name__ == "__main__":
    main()
