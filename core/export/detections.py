"""Checking an exported detector against PyTorch: the same detections, up to the order of those
whose scores tie.

Detections come sorted by score, and two runtimes break ties differently: anchors over a uniform
region (sky, a padded border) score exactly alike, and ONNX Runtime's resize and softmax differ from
PyTorch's in the last bits, enough to swap two detections a few millionths apart. Comparing row by
row would call such an export broken."""

from __future__ import annotations

import numpy as np

from core.errors import ExportError
from core.export.spec import ONNX_RELATIVE_TOLERANCE


def detection_difference(reference: dict[str, np.ndarray], got: dict[str, np.ndarray]) -> float:
    """The max abs difference between two runs' detections of one image (`boxes` 1×K×4, `scores` 1×K,
    `labels` 1×K, `num_detections` 1, as core.graph.detectors returns them): the same count, scores
    rank by rank, and each detection of a run of tied scores (within ONNX_RELATIVE_TOLERANCE of the top
    score) matched to one of the same label, with its box within the tolerance of the boxes' scale,
    among the other run's detections at those ranks. Raises ExportError where they differ."""
    if not np.array_equal(reference["num_detections"], got["num_detections"]):
        raise ExportError(f"ONNX Runtime finds {int(got['num_detections'][0])} detections where PyTorch finds "
                          f"{int(reference['num_detections'][0])}.")
    scores, other_scores = reference["scores"][0], got["scores"][0]
    boxes, other_boxes = reference["boxes"][0], got["boxes"][0]
    labels, other_labels = reference["labels"][0], got["labels"][0]
    score_tolerance = ONNX_RELATIVE_TOLERANCE * (float(np.abs(scores).max()) or 1.0)
    box_tolerance = ONNX_RELATIVE_TOLERANCE * (float(np.abs(boxes).max()) or 1.0)
    score_diff = np.abs(scores - other_scores)
    if score_diff.size and float(score_diff.max()) > score_tolerance:
        rank = int(score_diff.argmax())
        raise ExportError(f"ONNX Runtime disagrees with PyTorch on the score of detection {rank}: "
                          f"{other_scores[rank]:.6g} against {scores[rank]:.6g}.")
    max_abs = float(score_diff.max()) if score_diff.size else 0.0
    for start, end in _tied_runs(scores, score_tolerance):
        box_diff = np.abs(boxes[start:end, None] - other_boxes[None, start:end]).max(-1)
        fits = (labels[start:end, None] == other_labels[None, start:end]) & (box_diff <= box_tolerance)
        taken = np.zeros(end - start, dtype=bool)
        for row in range(end - start):
            free = np.flatnonzero(fits[row] & ~taken)
            if not free.size:
                raise ExportError(f"PyTorch's detection {start + row} (label {labels[start + row]}, box "
                                  f"{boxes[start + row].round(2).tolist()}) has no match among ONNX Runtime's "
                                  f"detections of the same score.")
            taken[free[0]] = True
            max_abs = max(max_abs, float(box_diff[row, free[0]]))
    return max_abs


def _tied_runs(scores: np.ndarray, tolerance: float) -> list[tuple[int, int]]:
    """[start, end) ranges of consecutive scores each within `tolerance` of the one before."""
    runs = []
    start = 0
    for rank in range(1, len(scores) + 1):
        if rank == len(scores) or abs(float(scores[rank - 1]) - float(scores[rank])) > tolerance:
            runs.append((start, rank))
            start = rank
    return runs
