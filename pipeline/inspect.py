"""A bundle's manifest as text a person reads in a terminal (`vaeguard inspect`)."""

from __future__ import annotations

from pipeline.calibrate import FPR_RANGE_KEY, format_fpr_range
from pipeline.errors import BundleError, one_line
from pipeline.unseen import percent


def _table(rows: list[tuple[str, ...]], indent: str = "  ") -> list[str]:
    if not rows:
        return [indent + "(none)"]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return [indent + "  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return "-" if value is None else str(value)


def describe_manifest(manifest: dict) -> str:
    # Bundle.load checks the entries scoring needs; the ones only shown here may still be missing
    # or of another type in a hand-edited manifest, which is the bundle's fault, not a crash.
    try:
        return _describe(manifest)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
        raise BundleError(f"bundle {manifest.get('name')!r}: manifest.json is incomplete or malformed "
                          f"({type(exc).__name__}: {one_line(exc)}); `vaeguard inspect --json` shows it as it is; "
                          f"re-export the bundle to get a complete one") from exc


def _describe(manifest: dict) -> str:
    lines = [
        f"bundle {manifest['name']}  version {manifest['version']}  created {manifest['created_at']}",
        f"trained on {manifest['source']['data']}",
        "",
        *(_image_inputs(manifest) if manifest.get("modality") == "image" else _table_inputs(manifest)),
    ]
    model, training, cal = manifest["model"], manifest["training"], manifest["calibration"]
    architecture = (f"convolutional VAE {model['channels']}x{model['size']}x{model['size']}, feature maps "
                    f"{model['feature_map_sizes']}, latent {model['latent_dim']}" if model.get("kind") == "conv" else
                    f"MLP VAE {model['n_features']} -> {model['hidden_sizes']} -> latent {model['latent_dim']}")
    lines += [
        "",
        f"model: {architecture} ({model['activation']}), beta {model['beta']}",
        f"score: {manifest['score']['definition']}",
        f"training: {training['epochs']} epochs, best {training['best_epoch']}, {training['seconds']:.1f}s on {training['device']}",
        "",
        "calibration:",
        *_table([("threshold", _fmt(cal["threshold"])), ("target FPR", _fmt(cal["target_fpr"])),
                 ("expected FPR", _fmt(cal["expected_fpr"])),
                 ("90% range", format_fpr_range(cal["rank"], cal["n_calibration"], cal.get(FPR_RANGE_KEY))),
                 ("calibration rows", _fmt(cal["n_calibration"]))]),
    ]
    if manifest.get("variants"):
        lines += ["reduced-precision scorers (own threshold; used only on the device they were checked on):",
                  *_table([_variant_row(precision, v) for precision, v in manifest["variants"].items()]),
                  *(f"  warning: {v['file']}: {warning}" for v in manifest["variants"].values()
                    for warning in v.get("warnings", []))]
    if manifest["metrics"]:
        lines += ["held-out metrics:", *_table([(k, _fmt(v)) for k, v in manifest["metrics"].items()])]
    verification = manifest.get("verification") or {}
    if verification:
        own = verification.get("consistency")  # not recorded by bundles calibrated on PyTorch's scores
        lines += ["export verification (onnxruntime vs PyTorch):",
                  *_table([(k, f"{v:.2e}") for k, v in verification["max_abs_diff"].items()]
                          + [("decisions", parity_of_decisions(verification))]
                          + ([("own calibration", f"scorer.onnx flags {own['flagged']:,} of its {own['rows']:,} "
                                                  f"calibration inputs, those above the threshold")] if own else []))]
    lines += ["files (sha256):", *_table([(name, digest) for name, digest in manifest["files"].items()]),
              "versions: " + ", ".join(f"{k} {v}" for k, v in manifest["versions"].items())]
    return "\n".join(lines)


def parity_of_decisions(verify: dict) -> str:
    """How many calibration rows PyTorch decides as onnxruntime does, as a count: a percentage read
    99.80% where the one other row scores at the threshold itself, where float rounding decides.

    The bundle's decisions are scorer.onnx's (its threshold is one of its own scores); PyTorch's
    are an export check, and may round a row at the threshold to the other side."""
    rows = verify["rows"]
    differ = rows - round(verify["decision_agreement"] * rows)
    at = verify.get("differ_at_threshold", 0)  # not recorded by bundles before it was counted
    text = f"agree on {rows - differ:,} of {rows:,} rows"
    return text + (f" (the other {at:,} at the threshold, where float rounding decides; the bundle decides as "
                   f"scorer.onnx)" if at and at == differ else "")


def _variant_row(precision: str, entry: dict) -> tuple[str, ...]:
    # The threshold of the variant's calibration section, the one `vaeguard score` checks against
    # the graph it decides with; the entry's top-level copy is checked by nothing.
    cal = entry["calibration"]
    return (precision, entry["file"], f"threshold {_fmt(cal['threshold'])}",
            f"expected FPR {_fmt(cal['expected_fpr'])}",
            f"agrees with fp32 on {agreeing(entry):,}/{cal['n_calibration']:,}{rounding_note(entry, '')}",
            f"median rel error {_percent(entry['median_rel_score_error'])}",
            f"checked on {_fmt(entry.get('device'))}", f"speed {entry['speed_ratio']:.2f}x")


def agreeing(entry: dict) -> int:
    """How many calibration inputs a variant decides as fp32 does: a count, since a percentage
    rounded to two decimals shows 1 difference in 20,000 as 100.00%."""
    rows = entry["calibration"]["n_calibration"]
    return rows - entry.get("decisions_differ", round((1 - entry["decision_agreement"]) * rows))


def rounding_note(entry: dict, why: str = ", where float rounding decides") -> str:
    """The differences within rounding of fp32's threshold (pipeline.precision.FP32_ROUNDING)."""
    at = entry.get("differ_at_fp32_threshold", 0)  # not recorded by exports before it was counted
    return f" ({at:,} at fp32's threshold{why})" if at else ""


def _percent(fraction: float) -> str:
    """Three significant digits: a fixed number of decimals shows a 0.003% error as 0.00%."""
    return f"{fraction * 100:.3g}%"


def _image_inputs(manifest: dict) -> list[str]:
    image = manifest["image"]
    return [f"images: {image['size']}x{image['size']}, mode {image['mode']}, resize {image['resize']}, "
            f"scale {image['scale']} ({manifest['source'].get('images', '?')} trained on, "
            f"{manifest['source'].get('skipped', 0)} unreadable skipped)"]


def _spelled(entry: dict) -> str:
    """The other spellings a categorical column takes (Preprocessor's spellings), for the reader."""
    if entry.get("boolean"):
        return "boolean (true/True/TRUE, false/False/FALSE)"
    example = next((c for c in entry["categories"] if c), None)
    if entry.get("integer") and example is not None:
        return f"integer-coded ({example + '.0'!r} reads as {example!r})"
    return ""


def _unknown_share(entry: dict) -> str:
    """Training's share of rows in the unknown bucket, which scoring's warning on unseen values is
    judged against (pipeline.unseen); bundles exported before it was recorded have none."""
    share = entry.get("unknown_share")
    return "" if share is None else f"unknown in training {percent(share)}"


def _blank_share(entry: dict) -> str:
    """Training's share of blank rows, which scoring's warning on blank columns is judged against;
    bundles exported before it was recorded have none."""
    share = entry.get("missing_share")
    return "" if share is None else f"blank in training {percent(share)}"


def _table_inputs(manifest: dict) -> list[str]:
    schema, pre = manifest["schema"], manifest["preprocessing"]
    lines = [
        "numeric columns (median, robust scale, missing indicator, blank share in training):",
        *_table([(s["name"], _fmt(s["median"]), _fmt(s["scale"]), "yes" if s["has_indicator"] else "",
                  _blank_share(s)) for s in pre["numeric"]]),
        "categorical columns (kept categories; others map to unknown):",
        *_table([(s["name"], ", ".join(repr(c) for c in s["categories"][:12])
                  + (" ..." if len(s["categories"]) > 12 else ""),
                  _unknown_share(s), _spelled(s)) for s in pre["categorical"]]),
        f"id columns: {', '.join(schema['id_columns']) or '-'}   label column: {schema['label_column'] or '-'}",
    ]
    if schema["dropped"]:
        lines.append("dropped: " + ", ".join(f"{d['column']} ({d['reason']})" for d in schema["dropped"]))
    return lines
