"""torchvision detectors as tensor-in, tensor-out models: what the pipeline traces, measures and exports
in place of the detector itself.

In eval mode a torchvision detector (Faster R-CNN, SSD, RetinaNet, FCOS) takes a list of images and
returns one dict of variable length per image. `TensorDetector` takes a batch tensor and returns
fixed-shape tensors: `boxes` B×K×4, `scores` B×K and `labels` B×K hold each image's detections in the
detector's order (best first), padded to K, the detector's detections per image, with zero boxes,
scores and labels; `num_detections` (B) says how many rows of each image are real. Fixed shapes are
what lets the pipeline tell a cut that changes an output from one that does not, and export at all.
In train mode it is the detector: images and targets in, losses out.

Its ONNX export takes one image (`one_image_per_call`): the detector's preprocessing, proposal
filtering and post-processing loop over the images of a batch in Python, which the trace unrolls for
the example's batch size, so no batch size but the traced one would run.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models.detection.fcos import FCOS
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.retinanet import RetinaNet
from torchvision.models.detection.ssd import SSD

DETECTORS = (GeneralizedRCNN, SSD, RetinaNet, FCOS)
OUTPUTS = ("boxes", "scores", "labels", "num_detections")


class TensorDetector(nn.Module):
    """A torchvision detector taking a batch tensor and returning fixed-shape detections (module doc)."""

    def __init__(self, detector: nn.Module) -> None:
        super().__init__()
        if not isinstance(detector, DETECTORS):
            raise TypeError(f"Not a torchvision detector: {type(detector).__name__}.")
        self.detector = detector
        self.train(detector.training)

    @property
    def detections_per_image(self) -> int:
        holder = self.detector.roi_heads if isinstance(self.detector, GeneralizedRCNN) else self.detector
        return int(holder.detections_per_img)

    def forward(self, images: torch.Tensor | list[torch.Tensor],
                targets: list[dict[str, torch.Tensor]] | None = None) -> dict[str, torch.Tensor]:
        if self.training:
            return self.detector(list(images), targets)  # the losses
        detections = self.detector(list(images))
        k = self.detections_per_image
        padded = {name: torch.stack([_padded(d[name], k) for d in detections]) for name in OUTPUTS[:3]}
        # counted with tensor ops: the trace would freeze len() as the example's count
        counts = torch.stack([torch.ones_like(d["scores"], dtype=torch.int64).sum().clamp(max=k) for d in detections])
        return padded | {"num_detections": counts}


def _padded(values: torch.Tensor, k: int) -> torch.Tensor:
    """The first `k` rows of `values`, zero rows appended where it has fewer; concatenating k zero rows
    then slicing keeps the shape static in a traced export, where the row count is data-dependent."""
    zeros = values.new_zeros((k, *values.shape[1:]))
    return torch.cat([values, zeros])[:k]


def as_tensor_model(model: nn.Module) -> nn.Module:
    """`model` wrapped as a TensorDetector when it is a torchvision detector, else `model` itself."""
    return TensorDetector(model) if isinstance(model, DETECTORS) else model


def one_image_per_call(model: nn.Module) -> bool:
    """Whether `model` exports for one image at a time (TensorDetector, module doc)."""
    return isinstance(model, TensorDetector)
