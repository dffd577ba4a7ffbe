"""bna-export: find out whether an image classifier is backdoored, repair it without changing a
trained weight (BNA), and evaluate the repaired classifier.

The public API is listed in ``__all__``; each name is imported from its module when first used,
so that ``import bna_export.runtime`` (the serving side) needs only onnxruntime and numpy."""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_API = {
    # name: (module, attribute)
    "adapt_onnx": ("model", "adapt_onnx"),
    "verify_built": ("export", "verify_built"),
    "Audit": ("audit", "Audit"),
    "audit_file": ("audit", "audit_file"),
    "audit_model": ("audit", "audit_model"),
    "BadInputError": ("errors", "BadInputError"),
    "BnaError": ("errors", "BnaError"),
    "BnaModel": ("norm", "BnaModel"),
    "BnaNorm": ("norm", "BnaNorm"),
    "compute_metrics": ("metrics", "compute_metrics"),
    "Dataset": ("data", "Dataset"),
    "detect_pairs": ("detect", "detect_pairs"),
    "Detection": ("detect", "Detection"),
    "DetectSettings": ("settings", "DetectSettings"),
    "divergence": ("histogram", "divergence"),
    "effects": ("detect", "effects"),
    "Evidence": ("fitfile", "Evidence"),
    "fit_defence": ("defend", "fit_defence"),
    "flag_drops": ("mitigated", "flag_drops"),
    "fit_thetas": ("fit", "fit_thetas"),
    "FitFile": ("artifact", "FitFile"),
    "FitFileError": ("errors", "FitFileError"),
    "FitOutcome": ("defend", "FitOutcome"),
    "FitRecord": ("fitfile", "FitRecord"),
    "FitSettings": ("settings", "FitSettings"),
    "HistogramSettings": ("settings", "HistogramSettings"),
    "intrinsic_check": ("target_rules", "intrinsic_check"),
    "layer_divergence": ("layer_divergence", "layer_divergence"),
    "load_data": ("data", "load_data"),
    "load_fit": ("artifact", "load"),
    "load_model": ("model", "load_model"),
    "load_npz": ("data", "load_npz"),
    "mad_scores": ("detect", "mad_scores"),
    "natural_targets": ("natural", "natural_targets"),
    "map_pairs": ("universal", "map_pairs"),
    "Mitigation": ("fitfile", "Mitigation"),
    "ModelError": ("errors", "ModelError"),
    "outliers": ("detect", "outliers"),
    "pair_problems": ("sweep", "pair_problems"),
    "pair_statistics": ("detect", "pair_statistics"),
    "predict_mitigated": ("mitigated", "predict_mitigated"),
    "Prediction": ("mitigated", "Prediction"),
    "Problem": ("reverse", "Problem"),
    "render_report": ("html_report", "render"),
    "report_file": ("html_report", "report_file"),
    "reverse_engineer": ("reverse", "reverse_engineer"),
    "Routing": ("fitfile", "Routing"),
    "ReverseSettings": ("settings", "ReverseSettings"),
    "run_sweep": ("sweep", "run_sweep"),
    "save_fit": ("artifact", "save"),
    "Settings": ("settings", "Settings"),
    "Shard": ("distributed", "Shard"),
    "size_matrices": ("sweep", "size_matrices"),
    "soft_histogram": ("histogram", "soft_histogram"),
    "solve": ("distributed", "solve"),
    "SweepResult": ("sweep", "SweepResult"),
    "target_alignments": ("natural", "target_alignments"),
    "target_scores": ("detect", "target_scores"),
    "TriggerEstimate": ("reverse", "TriggerEstimate"),
    "vote_targets": ("target_rules", "vote_targets"),
    "with_overrides": ("settings", "with_overrides"),
}

__all__ = sorted([*_API, "__version__"])


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module, attr = _API[name]
    value = getattr(importlib.import_module(f".{module}", __name__), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])
