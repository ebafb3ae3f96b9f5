"""IDAP++ core: divergence-based filter pruning and layer removal with recovery.

Pure PyTorch + torch-pruning + ONNX; no web, database or queue imports.
"""

from core.data import Dataset
from core.errors import Cancelled, UserError
from core.inputs import Inputs
from core.intake.npz import load_npz
from core.options import CompressOptions, Target
from core.progress import ProgressEvent
from core.report import PreflightReport, Report, ReportHeadline, StopReason
from core.run.pipeline import Result, compress

__all__ = [
    "Cancelled",
    "CompressOptions",
    "Dataset",
    "Inputs",
    "PreflightReport",
    "ProgressEvent",
    "Report",
    "ReportHeadline",
    "Result",
    "StopReason",
    "Target",
    "UserError",
    "compress",
    "load_npz",
]
