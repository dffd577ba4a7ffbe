"""bna-export: find a backdoor in an image classifier, repair it without changing a trained
weight (BNA), and evaluate the repaired classifier."""

__version__ = "0.1.0"

from .artifact import FitFile, load as load_fit, save as save_fit  # noqa: E402
from .attacks import Trigger, all_to_all, all_to_one, poison, triggered_set  # noqa: E402
from .data import Dataset, load_data, load_npz  # noqa: E402
from .defend import FitOutcome, Mitigation, fit_defence  # noqa: E402
from .errors import BadInputError, BnaError, FitFileError, ModelError  # noqa: E402
from .fit import Prediction, fit_thetas, predict_mitigated  # noqa: E402
from .histogram import divergence, soft_histogram  # noqa: E402
from .metrics import compute_metrics  # noqa: E402
from .model import BnaModel, BnaNorm, load_model  # noqa: E402
from .reverse import Problem, TriggerEstimate, reverse_engineer  # noqa: E402
from .settings import (  # noqa: E402
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
    "poison",
    "predict_mitigated",
    "reverse_engineer",
    "save_fit",
    "soft_histogram",
    "triggered_set",
]
