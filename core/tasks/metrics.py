"""Task metrics that need more than one line: mAP@0.5 over detections, mIoU over label maps, recall@k
over embeddings."""

from __future__ import annotations

import torch
from torchvision.ops import box_iou

# A detection matches a ground-truth box of its class at this IoU or more (PASCAL VOC's AP@0.5).
IOU_THRESHOLD = 0.5


def _average_precision(scores: torch.Tensor, hits: torch.Tensor, positives: int) -> float:
    """All-point interpolated AP (VOC 2010+) of detections with `scores` and whether each was a hit."""
    order = scores.argsort(descending=True)
    hits = hits[order].double()
    tp = hits.cumsum(0)
    precision = tp / torch.arange(1, len(hits) + 1, dtype=torch.float64)
    recall = tp / positives
    # the precision envelope: at each recall, the best precision at that recall or beyond
    envelope = precision.flip(0).cummax(0).values.flip(0)
    steps = torch.cat([recall[:1], recall[1:] - recall[:-1]])
    return float((steps * envelope).sum())


def mean_average_precision(predictions: list[dict[str, torch.Tensor]], truths: list[dict[str, torch.Tensor]]) -> float:
    """mAP@0.5 over the classes that have ground-truth boxes; each image's predictions and truths are
    dicts with `boxes` (K×4, x1 y1 x2 y2) and `labels` (K), predictions also `scores`. 1.0 when no image
    has a ground-truth box and no prediction, 0.0 when only predictions."""
    classes = sorted({int(c) for t in truths for c in t["labels"].tolist()})
    if not classes:
        return 1.0 if all(len(p["boxes"]) == 0 for p in predictions) else 0.0
    aps = []
    for cls in classes:
        scores, hits, positives = [], [], 0
        for pred, truth in zip(predictions, truths, strict=True):
            gt = truth["boxes"][truth["labels"] == cls]
            mine = pred["labels"] == cls
            boxes, box_scores = pred["boxes"][mine], pred["scores"][mine]
            positives += len(gt)
            matched = torch.zeros(len(gt), dtype=torch.bool)
            taken = torch.zeros(len(boxes), dtype=torch.bool)
            if len(gt) and len(boxes):
                iou = box_iou(boxes.float(), gt.float())
                for i in box_scores.argsort(descending=True).tolist():
                    best = torch.where(matched, -1.0, iou[i]).max(0)
                    if float(best.values) >= IOU_THRESHOLD:
                        matched[int(best.indices)] = True
                        taken[i] = True
            scores.append(box_scores)
            hits.append(taken)
        all_scores = torch.cat(scores) if scores else torch.zeros(0)
        aps.append(_average_precision(all_scores, torch.cat(hits), positives) if len(all_scores) else 0.0)
    return sum(aps) / len(aps)


def confusion(predicted: torch.Tensor, truth: torch.Tensor, num_classes: int, ignore: int = 255) -> torch.Tensor:
    """num_classes×num_classes counts of (truth, predicted) pixel pairs; `ignore` in `truth` is left out."""
    keep = truth != ignore
    pairs = truth[keep].long() * num_classes + predicted[keep].long()
    return torch.bincount(pairs, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def mean_iou(matrix: torch.Tensor) -> float:
    """Mean IoU over the classes present in the truth or the prediction of a confusion matrix."""
    inter = matrix.diag().double()
    union = matrix.sum(0).double() + matrix.sum(1).double() - inter
    present = union > 0
    return float((inter[present] / union[present]).mean()) if bool(present.any()) else 1.0


def recall_at_k(embeddings: torch.Tensor, groups: torch.Tensor, k: int = 10) -> float:
    """The share of samples that have a partner (another sample of the same group) among their `k`
    nearest others by cosine similarity; samples without a partner are not queries."""
    unit = torch.nn.functional.normalize(embeddings.double(), dim=1)
    similarity = unit @ unit.T
    similarity.fill_diagonal_(-torch.inf)
    same = groups[:, None] == groups[None, :]
    same.fill_diagonal_(False)
    queries = same.any(1)
    if not bool(queries.any()):
        raise ValueError("No sample has a partner of the same group.")
    nearest = similarity.topk(min(k, len(groups) - 1), dim=1).indices
    found = same.gather(1, nearest).any(1)
    return float(found[queries].double().mean())
