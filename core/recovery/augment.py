"""Cheap augmentation of the recovery batches, for calibration sets too small to fine-tune on as they are.

Recovery distils the model before a step into the pruned one; teacher and student see the same
augmented batch, so the inputs need not keep their labels' meaning, only stay like the data. With a
few hundred samples and a floor of optimizer iterations, every sample is seen many times: the
student then learns to match the teacher on those samples rather than near them. Augmenting only
recovery (never scoring or the held-out evaluation) spreads the matching around the data.

- Images (float inputs N×C×H×W): a random horizontal flip, a random crop of 50-100 % of the side
  resized back (one batched `grid_sample`), and, for unlabeled data, CutMix on half the samples (a
  box of up to half the area from another sample of the batch). CutMix rather than a blend: a
  blend shrinks the pixel variance that BatchNorm's running statistics then learn.
- Token ids (integer inputs N×L): a tenth of the real tokens (the attention mask's ones, other
  than the first and last of each row) are swapped for real tokens drawn from the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

from core.data import Dataset
from core.inputs import Inputs, Signature
from core.options import Augmentation

# "auto" augments images with both sides at least this long (photos; not 8x8 digits or 28x28 MNIST) ...
PHOTO_MIN_SIDE = 32
# ... when the recovery split has fewer samples than this.
SMALL_DATA = 5000
CROP_MIN = 0.5  # a crop's side as a share of the image's, at least
CUTMIX_SHARE = 0.5  # of the samples of an unlabeled batch
TOKEN_SWAP = 0.1  # of the real tokens


@dataclass(frozen=True)
class Augmenter:
    """Augments a recovery batch (on its device) with random numbers from a CPU generator."""

    images: tuple[str, ...]
    tokens: tuple[str, ...]
    mask: str | None  # the attention mask that says which token positions are real
    mix: bool  # CutMix images (only without labels: a mixed image has no one label)

    def describe(self) -> str:
        parts = []
        if self.images:
            parts.append("flips and crops" + (" and CutMix" if self.mix else "") + f" of {', '.join(self.images)}")
        if self.tokens:
            parts.append(f"token swaps in {', '.join(self.tokens)}")
        return "; ".join(parts)

    def __call__(self, batch: Inputs, generator: torch.Generator) -> Inputs:
        tensors = dict(batch.tensors)
        for name in self.images:
            tensors[name] = _augment_images(tensors[name], generator, self.mix)
        mask = tensors.get(self.mask) if self.mask is not None else None
        for name in self.tokens:
            tensors[name] = _swap_tokens(tensors[name], mask, generator)
        return Inputs(tensors, batch.positional)


def _is_image(signature: Signature, min_side: int) -> bool:
    shape = signature.shape
    return signature.dtype.is_floating_point and len(shape) == 3 and shape[0] <= 4 and min(shape[1:]) >= min_side


def _is_token_ids(signature: Signature) -> bool:
    name = signature.name.lower()
    return signature.is_sequence and not any(word in name for word in ("mask", "type", "position"))


def choose_augmenter(recovery: Dataset, mode: Augmentation) -> Augmenter | None:
    """The augmentation recovery uses on `recovery` (the recovery split) under `mode`, or None.

    "auto" augments only photo-sized images, and only when the split is small: the token swaps and
    small images are there for "on", not measured to help by default (README, Decisions)."""
    if mode == Augmentation.OFF or (mode == Augmentation.AUTO and len(recovery) >= SMALL_DATA):
        return None
    signatures = recovery.inputs.signature
    auto = mode == Augmentation.AUTO
    images = tuple(s.name for s in signatures if _is_image(s, PHOTO_MIN_SIDE if auto else 2))
    tokens = () if auto else tuple(s.name for s in signatures if _is_token_ids(s))
    if not images and not tokens:
        return None
    mask = next((s.name for s in signatures if s.is_sequence and "mask" in s.name.lower()), None)
    return Augmenter(images, tokens, mask, mix=not recovery.labeled)


def _uniform(n: int, generator: torch.Generator, low: float = 0.0, high: float = 1.0) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=generator)


def _augment_images(x: torch.Tensor, generator: torch.Generator, mix: bool) -> torch.Tensor:
    n = x.shape[0]
    flip = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0)
    scale = _uniform(n, generator, CROP_MIN, 1.0)
    shift = (1 - scale)[:, None] * _uniform(2 * n, generator, -1.0, 1.0).view(n, 2)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 1, 1] = scale * flip, scale
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta.to(x.device, x.dtype), list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    if mix and n > 1:
        out = _cutmix(out, generator)
    return out


def _cutmix(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    n, _, height, width = x.shape
    partner = torch.randperm(n, generator=generator)
    mixed = torch.rand(n, generator=generator) < CUTMIX_SHARE
    side = _uniform(n, generator, 0.0, 0.5).sqrt()  # a box of up to half the area
    out = x.clone()
    for i in torch.nonzero(mixed).flatten().tolist():
        h, w = max(1, int(side[i] * height)), max(1, int(side[i] * width))
        top = int(torch.randint(height - h + 1, (1,), generator=generator))
        left = int(torch.randint(width - w + 1, (1,), generator=generator))
        out[i, :, top:top + h, left:left + w] = x[partner[i], :, top:top + h, left:left + w]
    return out


def _swap_tokens(ids: torch.Tensor, mask: torch.Tensor | None, generator: torch.Generator) -> torch.Tensor:
    real = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
    lengths = real.sum(1, keepdim=True)
    position = real.long().cumsum(1)  # 1 for the first real token, `lengths` for the last
    inner = real & (position > 1) & (position < lengths)
    pool = ids[inner]
    if pool.numel() == 0:
        return ids
    swap = inner & (torch.rand(ids.shape, generator=generator) < TOKEN_SWAP).to(ids.device)
    picks = torch.randint(pool.numel(), (int(swap.sum()),), generator=generator).to(ids.device)
    out = ids.clone()
    out[swap] = pool[picks]
    return out
