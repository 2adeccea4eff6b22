"""A small CNN trained here on scikit-learn's bundled ``digits`` (8x8 images, 10 classes).

It is the reference of another family: nothing in bitalloc may assume a transformer, a
tokenizer or a KV cache, and this model proves it. Training is seeded and takes seconds.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

TEST_FRACTION = 0.25
SEED = 0


class DigitsCNN(nn.Module):
    """conv 3x3 -> conv 3x3 -> max-pool -> two Linear layers."""

    def __init__(self, channels: tuple[int, int] = (16, 32), hidden: int = 64, classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, channels[0], 3, padding=1), nn.ReLU(),
            nn.Conv2d(channels[0], channels[1], 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(channels[1] * 16, hidden), nn.ReLU(), nn.Linear(hidden, classes),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(images))


def digits_split() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Train and test tensors: images scaled to [0, 1] as ``[B, 1, 8, 8]``, a fixed stratified split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = torch.tensor(data.images / 16.0, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(data.target, dtype=torch.long)
    train_idx, test_idx = train_test_split(range(len(y)), test_size=TEST_FRACTION, random_state=SEED, stratify=data.target)
    return x[train_idx], y[train_idx], x[test_idx], y[test_idx]


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(dim=1) == y).float().mean())


def build(dest: Path, log: Callable[[str], None], epochs: int = 40) -> dict:
    from safetensors.torch import save_file

    from bitalloc.quant.loading import MODULE_MANIFEST

    torch.manual_seed(SEED)
    x_train, y_train, x_test, y_test = digits_split()
    model = DigitsCNN()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    log(f"training the digits CNN on {len(y_train)} images")
    for _ in range(epochs):
        model.train()
        for batch in torch.randperm(len(y_train)).split(64):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x_train[batch]), y_train[batch]).backward()
            optimizer.step()
    model.eval()
    test_accuracy = accuracy(model, x_test, y_test)
    save_file(model.state_dict(), dest / "model.safetensors")
    info = {"test_accuracy": round(test_accuracy, 4), "train_images": len(y_train), "test_images": len(y_test)}
    (dest / MODULE_MANIFEST).write_text(json.dumps(
        {"architecture": "digits-cnn", "kwargs": {}, "example_input_shape": [1, 1, 8, 8], "info": info}, indent=2))
    log(f"digits CNN test accuracy {test_accuracy:.4f}")
    return {"asset": "cnn", "epochs": epochs, **info}
