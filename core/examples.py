"""A small trained model and its data, so a first run needs nothing but this package.

`DigitsNet` is a residual CNN for scikit-learn's 8×8 digits. It has what the method
works on: convolutions with BatchNorm (filter pruning) and residual blocks with identity
and projection shortcuts (layer removal). The classes live here, in an importable module,
so a model saved whole with `torch.save` unpickles in any process that has `core`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_model
from torch import nn
from torch.nn import functional as F

from core.errors import UserError

DEFAULT_EPOCHS = 6


class BasicBlock(nn.Module):
    """conv-bn-relu-conv-bn plus a shortcut; the shortcut projects when the shape changes."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + shortcut)


class DigitsNet(nn.Module):
    """Input N×1×8×8 in [0, 1], output N×10 logits."""

    def __init__(self, width: int = 32, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
        )
        self.blocks = nn.Sequential(
            BasicBlock(width, width),
            BasicBlock(width, width),
            BasicBlock(width, 2 * width, stride=2),
            BasicBlock(2 * width, 2 * width),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.blocks(self.stem(x))), 1))


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn digits as x: float32 N×1×8×8 in [0, 1], y: int64 N."""
    try:
        from sklearn.datasets import load_digits  # only the example needs scikit-learn
    except ImportError as exc:
        raise UserError("The digits example needs scikit-learn.",
                        hint="Install it: pip install scikit-learn.") from exc
    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None, :, :]
    return x, digits.target.astype(np.int64)


def fit_digits_net(x: np.ndarray, y: np.ndarray, seed: int = 0, epochs: int = DEFAULT_EPOCHS) -> DigitsNet:
    """Train a fresh DigitsNet with its own RNG, so the result depends only on the arguments."""
    # fork_rng keeps the caller's global RNG untouched while the seed fixes initialisation.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DigitsNet()
    inputs, labels = torch.from_numpy(x), torch.from_numpy(y)
    order_rng = torch.Generator().manual_seed(seed)
    batch_size = 64
    steps = epochs * -(-len(inputs) // batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=max(steps, 1))
    model.train()
    for _ in range(epochs):
        for index in torch.randperm(len(inputs), generator=order_rng).split(batch_size):
            loss = F.cross_entropy(model(inputs[index]), labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    return model.eval()


def train_digits_model(
    seed: int = 0, epochs: int = DEFAULT_EPOCHS
) -> tuple[DigitsNet, np.ndarray, np.ndarray]:
    """A DigitsNet trained on all digits, with the arrays it was trained on."""
    x, y = load_digits_arrays()
    return fit_digits_net(x, y, seed, epochs), x, y


def make_digits_example(out_dir: Path, seed: int = 0, epochs: int = DEFAULT_EPOCHS) -> tuple[Path, Path]:
    """Write `model.pt` (the whole module), `model.safetensors` (its weights, architecture
    `idap:digits`, the form a service upload takes) and `data.npz` (x, y) into `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model, x, y = train_digits_model(seed, epochs)
    model_path, data_path = out_dir / "model.pt", out_dir / "data.npz"
    torch.save(model, model_path)
    save_model(model, str(model_path.with_suffix(".safetensors")))
    np.savez(data_path, x=x, y=y)
    return model_path, data_path
