"""IDAP++ core: divergence-based filter pruning and layer removal with recovery.

Pure PyTorch + torch-pruning + ONNX; no web, database or queue imports.
"""

from core.data import Dataset, load_npz
from core.errors import Cancelled, UserError
from core.options import CompressOptions, Target
from core.pipeline import Result, compress
from core.progress import ProgressEvent

__all__ = [
    "Cancelled",
    "CompressOptions",
    "Dataset",
    "ProgressEvent",
    "Result",
    "Target",
    "UserError",
    "compress",
    "load_npz",
]
