"""Decoding the raw head of an exported YOLO detector into per-image boxes, scores and labels: the
confidence and NMS thresholds of the Ultralytics exporters' defaults, so that the original's detections are
what its users see."""

from __future__ import annotations

import torch
from torchvision.ops import batched_nms

from core.tasks.kinds import DetectionDecoder

CONFIDENCE = 0.25
NMS_IOU = 0.45
MAX_DETECTIONS = 300


def decode_yolo(raw: torch.Tensor, layout: DetectionDecoder) -> list[dict[str, torch.Tensor]]:
    """Per-image detections (x1 y1 x2 y2 boxes) from a raw head output in `layout`."""
    if raw.ndim != 3:
        raise ValueError(f"A YOLO head output is N×anchors×values; got shape {tuple(raw.shape)}.")
    rows = raw.transpose(1, 2) if layout is DetectionDecoder.YOLOV8 else raw
    first_class = 4 if layout is DetectionDecoder.YOLOV8 else 5
    if rows.shape[2] <= first_class:
        raise ValueError(f"A {layout} head output has more than {first_class} values per anchor; got {rows.shape[2]}.")
    out = []
    for image in rows.float():
        scores, labels = image[:, first_class:].max(1)
        if layout is DetectionDecoder.YOLOV5:
            scores = scores * image[:, 4]
        keep = scores >= CONFIDENCE
        centre, size = image[keep, :2], image[keep, 2:4]
        boxes = torch.cat([centre - size / 2, centre + size / 2], dim=1)
        kept = batched_nms(boxes, scores[keep], labels[keep], NMS_IOU)[:MAX_DETECTIONS]
        out.append({"boxes": boxes[kept], "scores": scores[keep][kept], "labels": labels[keep][kept]})
    return out
