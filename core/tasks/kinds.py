"""The closed sets a task is named by: what a model does (`Task`) and what its quality is measured in
(`Metric`, with the direction and scale its budget applies to)."""

from __future__ import annotations

from enum import StrEnum


class Task(StrEnum):
    """What the model computes; `auto` infers it from the model's outputs (core.tasks.infer)."""

    AUTO = "auto"
    CLASSIFICATION = "classification"
    EMBEDDING = "embedding"
    DETECTION = "detection"
    SEGMENTATION = "segmentation"
    CAUSAL_LM = "causal-lm"
    GENERIC = "generic"


class Metric(StrEnum):
    """The quality measure the accuracy budget applies to. The values of the classification metrics are
    the names reports have always used."""

    TOP1 = "top1"
    TOP1_AGREEMENT = "top1_agreement_with_original"
    COSINE = "cosine_similarity_to_original"
    RECALL_AT_10 = "recall_at_10"
    MAP50 = "map50"
    MAP50_AGREEMENT = "map50_against_original"
    MIOU = "miou"
    MIOU_AGREEMENT = "miou_against_original"
    PERPLEXITY = "perplexity"
    RELATIVE_ERROR = "relative_output_error"

    @property
    def higher_is_better(self) -> bool:
        return self not in (Metric.PERPLEXITY, Metric.RELATIVE_ERROR)

    @property
    def relative(self) -> bool:
        """Whether the budget is a fraction of the original's value (perplexity) rather than absolute points."""
        return self is Metric.PERPLEXITY

    @property
    def is_fraction(self) -> bool:
        """Whether values are fractions shown as percentages (top-1, mIoU, ...), not a ratio like perplexity."""
        return self is not Metric.PERPLEXITY

    def drop(self, before: float, after: float) -> float:
        """How much worse `after` is than `before`, in the units the budget is given in (>0 is worse)."""
        worse = before - after if self.higher_is_better else after - before
        return worse / max(abs(before), 1e-12) if self.relative else worse

    def show(self, value: float) -> str:
        return f"{value:.2%}" if self.is_fraction else f"{value:.3f}"

    def show_change(self, before: float, after: float) -> str:
        """The change from `before` to `after`, in the budget's units (points, or percent of the original)."""
        if self.relative:
            return f"{(after - before) / max(abs(before), 1e-12):+.1%}"
        return f"{100 * (after - before):+.2f} pt"

    def limit(self, before: float, budget: float) -> float:
        """The worst value within `budget` of an original at `before` (the budget line of a chart)."""
        change = budget * abs(before) if self.relative else budget
        return before - change if self.higher_is_better else before + change

    def describe_budget(self, budget: float) -> str:
        """The budget in words, for the preflight, the report and the UI."""
        if self.relative:
            return f"{self.label} may rise by at most {budget:.1%} of the original's"
        verb = "drop" if self.higher_is_better else "rise"
        return f"{self.label} may {verb} by at most {budget * 100:.2f} points"

    @property
    def label(self) -> str:
        return _LABELS[self]


_LABELS = {
    Metric.TOP1: "top-1 accuracy",
    Metric.TOP1_AGREEMENT: "top-1 agreement with the original",
    Metric.COSINE: "cosine similarity to the original's embeddings",
    Metric.RECALL_AT_10: "retrieval recall@10",
    Metric.MAP50: "mAP@0.5",
    Metric.MAP50_AGREEMENT: "mAP@0.5 against the original's detections",
    Metric.MIOU: "mIoU",
    Metric.MIOU_AGREEMENT: "mIoU against the original's masks",
    Metric.PERPLEXITY: "perplexity",
    Metric.RELATIVE_ERROR: "relative output error",
}


class DetectionDecoder(StrEnum):
    """How a detector's outputs become boxes. `auto`: torchvision's per-image dicts or outputs named
    boxes/scores/labels; a model with neither (a raw head) is compared as dense outputs. The YOLO layouts
    decode an exported raw head (core.tasks.yolo)."""

    AUTO = "auto"
    YOLOV5 = "yolov5"  # N×anchors×(4 box + objectness + classes), centre-size boxes, scores already squashed
    YOLOV8 = "yolov8"  # N×(4 box + classes)×anchors, centre-size boxes, class scores already squashed
