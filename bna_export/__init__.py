"""bna-export: find out whether an image classifier is backdoored, repair it without changing a
trained weight (BNA), and evaluate the repaired classifier."""

__version__ = "0.1.0"

from .artifact import FitFile
from .artifact import load as load_fit
from .artifact import save as save_fit
from .attacks import Trigger, all_to_all, all_to_one, poison, triggered_set
from .data import Dataset, load_data, load_npz
from .defend import FitOutcome, fit_defence
from .detect import (
    Detection,
    detect_pairs,
    intrinsic_check,
    mad_scores,
    outliers,
    pair_statistics,
    target_scores,
)
from .distributed import Shard, solve
from .errors import BadInputError, BnaError, FitFileError, ModelError
from .fit import Prediction, fit_thetas, predict_mitigated
from .fitfile import FitRecord, Mitigation
from .histogram import divergence, soft_histogram
from .metrics import compute_metrics
from .model import BnaModel, adapt_onnx, load_model
from .norm import BnaNorm
from .reverse import Problem, TriggerEstimate, reverse_engineer
from .settings import (
    DetectSettings,
    FitSettings,
    HistogramSettings,
    ReverseSettings,
    Settings,
    with_overrides,
)
from .sweep import SweepResult, pair_problems, run_sweep, size_matrices

__all__ = [
    "BadInputError",
    "BnaError",
    "BnaModel",
    "BnaNorm",
    "Dataset",
    "DetectSettings",
    "Detection",
    "FitFile",
    "FitFileError",
    "FitOutcome",
    "FitRecord",
    "FitSettings",
    "HistogramSettings",
    "Mitigation",
    "ModelError",
    "Prediction",
    "Problem",
    "ReverseSettings",
    "Settings",
    "Shard",
    "SweepResult",
    "Trigger",
    "TriggerEstimate",
    "__version__",
    "adapt_onnx",
    "all_to_all",
    "all_to_one",
    "compute_metrics",
    "detect_pairs",
    "divergence",
    "fit_defence",
    "fit_thetas",
    "intrinsic_check",
    "load_data",
    "load_fit",
    "load_model",
    "load_npz",
    "mad_scores",
    "outliers",
    "pair_problems",
    "pair_statistics",
    "poison",
    "predict_mitigated",
    "reverse_engineer",
    "run_sweep",
    "save_fit",
    "size_matrices",
    "soft_histogram",
    "solve",
    "target_scores",
    "triggered_set",
    "with_overrides",
]
