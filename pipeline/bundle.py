"""The bundle on disk: manifest.json beside encoder.onnx, decoder.onnx and scorer.onnx.

The manifest is the contract with other runtimes: schema, preprocessing statistics, model
config, threshold and calibration table, metrics, export verification, sha256 of every file
and library versions. Loading a bundle checks every hash, so a modified or half-copied bundle
fails loudly instead of scoring with the wrong model.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from pipeline.calibrate import Calibration
from pipeline.errors import BundleError
from pipeline.preprocess import Preprocessor
from pipeline.schema import TableSchema

FORMAT = "vaeguard-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
MODEL_FILES = ("encoder.onnx", "decoder.onnx", "scorer.onnx")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def library_versions() -> dict[str, str]:
    versions = {}
    for package in ("vaeguard", "torch", "onnx", "onnxruntime-gpu", "onnxruntime", "numpy", "pandas", "pyarrow"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return versions


def write_manifest(directory: Path, manifest: dict) -> Path:
    path = directory / MANIFEST
    path.write_text(json.dumps(manifest, indent=2, allow_nan=False) + "\n")
    return path


def write_new_manifest(directory: Path, manifest: dict) -> None:
    """A freshly exported bundle's manifest: adds the file hashes and library versions, with
    verification still to come (the verify step fills it in before publishing)."""
    manifest |= {"verification": None,
                 "files": {name: sha256_file(directory / name) for name in MODEL_FILES},
                 "versions": library_versions()}
    write_manifest(directory, manifest)


@dataclass(frozen=True)
class Bundle:
    path: Path
    manifest: dict

    @property
    def name(self) -> str:
        return self.manifest["name"]

    @property
    def schema(self) -> TableSchema:
        return TableSchema.from_dict(self.manifest["schema"])

    @property
    def preprocessor(self) -> Preprocessor:
        return Preprocessor.from_dict(self.manifest["preprocessing"])

    @property
    def calibration(self) -> Calibration:
        return Calibration.from_dict(self.manifest["calibration"])

    @property
    def scorer_path(self) -> Path:
        return self.path / "scorer.onnx"

    @classmethod
    def load(cls, path: str | Path) -> "Bundle":
        path = Path(path)
        manifest_path = path / MANIFEST
        if not manifest_path.is_file():
            raise BundleError(f"{path}: not a bundle (no {MANIFEST}); pass a folder written by `vaeguard train`")
        try:
            manifest = json.loads(manifest_path.read_text())
        except json.JSONDecodeError as exc:
            raise BundleError(f"{manifest_path}: not valid JSON ({exc}); re-export the bundle") from exc
        if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
            raise BundleError(
                f"{manifest_path}: expected format {FORMAT} v{FORMAT_VERSION}, got "
                f"{manifest.get('format')} v{manifest.get('format_version')}; re-export with this version"
            )
        for name, expected in manifest["files"].items():
            file_path = path / name
            if not file_path.is_file():
                raise BundleError(f"{path}: {name} is missing; copy the whole bundle folder")
            actual = sha256_file(file_path)
            if actual != expected:
                raise BundleError(
                    f"{file_path}: sha256 {actual[:12]}... does not match the manifest's {expected[:12]}...; "
                    f"the file was modified or corrupted: re-export or re-copy the bundle"
                )
        return cls(path, manifest)


def publish_bundle(staging: Path, target: Path) -> None:
    """Move a finished bundle into place; whatever was at ``target`` stays until the swap.

    ``staging`` must sit on the same filesystem as ``target`` (the training run works inside
    the output folder for that reason), so both renames are atomic.
    """
    retired = target.parent / f".{target.name}.retired-{uuid.uuid4().hex[:8]}"
    if target.exists():
        os.replace(target, retired)
    os.replace(staging, target)
    shutil.rmtree(retired, ignore_errors=True)
