"""The seed's CNN: two conv layers and two fully connected layers, 431,080 parameters.

Conv2d(1,20,5,1)-ReLU-MaxPool2 -> Conv2d(20,50,5,1)-ReLU-MaxPool2 -> Linear(800,500)-ReLU ->
Linear(500,10) -> log_softmax, as in the PySyft asynchronous federated learning demo.
Runs on the device too (Python 3.8, torch).
"""

from __future__ import annotations

from typing import Dict

import torch
import torch.nn.functional as F
from torch import nn

NORMALIZE_MEAN = 0.1307
NORMALIZE_STD = 0.3081


class Net(nn.Module):
    """The seed's MNIST classifier; outputs log-probabilities over the 10 digits."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 20, 5, 1)
        self.conv2 = nn.Conv2d(20, 50, 5, 1)
        self.fc1 = nn.Linear(4 * 4 * 50, 500)
        self.fc2 = nn.Linear(500, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2, 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2, 2)
        x = F.relu(self.fc1(x.flatten(1)))
        return F.log_softmax(self.fc2(x), dim=1)


Weights = Dict[str, torch.Tensor]


def initial_weights(seed: int) -> Weights:
    """The model's initial weights for `seed`, without touching the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Net()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def weight_spec() -> Dict[str, tuple]:
    """Name -> (shape, dtype) of the model's weights: what every update must match."""
    with torch.device("meta"):
        model = Net()
    return {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}


def build_model(weights: Weights, device: str = "cpu") -> Net:
    """A Net on `device` holding `weights`."""
    model = Net()
    model.load_state_dict(weights)
    return model.to(device)


def num_parameters(weights: Weights) -> int:
    """Total number of scalar parameters in `weights`."""
    return sum(int(t.numel()) for t in weights.values())
