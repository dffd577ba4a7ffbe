"""What a fit file holds, as typed frozen records, and the one owner of its header layout: write a
record with :func:`to_fit`, read one with :func:`read` or :func:`load` (validated once, so every
other module uses the records, never the raw header); :class:`Mitigation` is the part the
mitigated classifier needs. :mod:`bna_export.artifact` owns the bytes."""

from .layout import header_of, load, read, to_fit
from .mitigation import Mitigation
from .records import (
    Detection,
    Evidence,
    FitRecord,
    Intrinsic,
    Layer,
    PairScore,
    Probes,
    Routing,
    Trigger,
    routed_answers,
)

__all__ = [
    "Detection",
    "Evidence",
    "FitRecord",
    "Intrinsic",
    "Layer",
    "Mitigation",
    "PairScore",
    "Probes",
    "Routing",
    "Trigger",
    "header_of",
    "load",
    "read",
    "routed_answers",
    "to_fit",
]
