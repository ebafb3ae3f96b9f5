"""Models with more than one input, and a synthetic token task on which the attention mask decides
the answer: built by factories (`tests.multi_input_models:token_classifier`) as a user's own code is."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_model
from torch import nn
from torch.nn import functional as F

from core.graph.outputs import select_output

VOCAB = 32
POSITIVE = range(1, VOCAB // 2)  # tokens that count for class 1; the others count for class 0
LENGTH = 12


class TokenClassifier(nn.Module):
    """Token ids and an attention mask in, two logits out: the mean of the real tokens' embeddings
    through an MLP. Padding positions hold random tokens, so only the mask says which ones count."""

    def __init__(self, dim: int = 32, hidden: int = 128) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, 2))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        mask = attention_mask.unsqueeze(-1).to(self.embed.weight.dtype)
        pooled = (self.embed(input_ids) * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return self.mlp(pooled)


def token_classifier() -> TokenClassifier:
    torch.manual_seed(0)
    return TokenClassifier()


@dataclass(frozen=True)
class Tokens:
    input_ids: np.ndarray  # int64, N × LENGTH
    attention_mask: np.ndarray  # int64, N × LENGTH
    labels: np.ndarray  # int64, N


def token_task(n: int, length: int = LENGTH, seed: int = 0) -> Tokens:
    """Label 1 when most real tokens are POSITIVE; the padding after them is random tokens too."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, VOCAB, size=(n, length)).astype(np.int64)
    real = rng.integers(3, length + 1, size=n)
    mask = (np.arange(length)[None, :] < real[:, None]).astype(np.int64)
    positive = ((ids < POSITIVE.stop) & (mask == 1)).sum(1)
    labels = (2 * positive > real).astype(np.int64)
    return Tokens(ids, mask, labels)


def fit(model: nn.Module, inputs: dict[str, np.ndarray], labels: np.ndarray, steps: int = 300,
        lr: float = 3e-3) -> nn.Module:
    """`model` trained briefly with Adam on seeded random batches of 64 (inputs by name; the logits are its
    output, or a ModelOutput's), returned in eval mode."""
    tensors = {name: torch.from_numpy(array) for name, array in inputs.items()}
    targets = torch.from_numpy(labels)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        batch = torch.randint(0, len(targets), (64,), generator=generator)
        loss = F.cross_entropy(select_output(model(**{name: t[batch] for name, t in tensors.items()}), None),
                               targets[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def trained_token_classifier(data: Tokens, steps: int = 300) -> nn.Module:
    return fit(token_classifier(), {"input_ids": data.input_ids, "attention_mask": data.attention_mask},
               data.labels, steps)


def write_token_files(directory: Path, n: int = 768) -> tuple[Path, Path, nn.Module]:
    """(weights.safetensors, data.npz with input_ids, attention_mask and labels, the trained model)."""
    data = token_task(n)
    model = trained_token_classifier(token_task(4096, seed=1))
    weights = directory / "tokens.safetensors"
    save_model(model, str(weights))
    npz = directory / "tokens.npz"
    np.savez(npz, input_ids=data.input_ids, attention_mask=data.attention_mask, labels=data.labels)
    return weights, npz, model


class ImageAndFeatures(nn.Module):
    """An image and a per-sample feature vector in, logits out (a conv branch and an MLP branch)."""

    def __init__(self, features: int = 6, classes: int = 4) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                  nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.side = nn.Sequential(nn.Linear(features, 32), nn.ReLU())
        self.head = nn.Linear(64, classes)

    def forward(self, image: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([self.conv(image), self.side(features)], dim=1))
