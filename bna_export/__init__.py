"""bna-export: find a backdoor in an image classifier, repair it without changing a trained
weight (BNA), and evaluate the repaired classifier."""

__version__ = "0.1.0"

from .artifact import FitFile
from .artifact import load as load_fit
from .artifact import save as save_fit
from .attacks import Trigger, all_to_all, all_to_one, poison, triggered_set
from .data import Dataset, load_data, load_npz
from .defend import FitOutcome, Mitigation, fit_defence
from .errors import BadInputError, BnaError, FitFileError, ModelError
from .fit import Prediction, fit_thetas, predict_mitigated
from .histogram import divergence, soft_histogram
from .metrics import compute_metrics
from .model import BnaModel, BnaNorm, load_model
from .reverse import Problem, TriggerEstimate, reverse_engineer
from .settings import (
    DetectSettings,
    FitSettings,
    HistogramSettings,
    ReverseSettings,
    Settings,
)

__all__ = [
    "BadInputError",
    "BnaError",
    "BnaModel",
    "BnaNorm",
    "Dataset",
    "DetectSettings",
    "FitFile",
    "FitFileError",
    "FitOutcome",
    "FitSettings",
    "HistogramSettings",
    "Mitigation",
    "ModelError",
    "Prediction",
    "Problem",
    "ReverseSettings",
    "Settings",
    "Trigger",
    "TriggerEstimate",
    "__version__",
    "all_to_all",
    "all_to_one",
    "compute_metrics",
    "divergence",
    "fit_defence",
    "fit_thetas",
    "load_data",
    "load_fit",
    "load_model",
    "load_npz",
    "mad_scores",
    "outliers",
    "poison",
    "predict_mitigated",
    "reverse_engineer",
    "save_fit",
    "soft_histogram",
    "triggered_set",
]
