"""Shared fixtures: tiny models that trace and run in milliseconds on CPU."""
import os

# OpenMP threads that spin while another process holds the other core make CPU torch 10-50x slower on
# shared 2-core machines; passive waiting avoids it (must be set before torch initialises OpenMP).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import importlib.util
import math
import pathlib

import pytest
import torch
from torch import nn

import rtl_plugin as rtl
from _helpers import TinyCNN  # noqa: E402  (tests/ is on sys.path: rootdir conftest)

import os

if os.environ.get("PYTEST_XDIST_WORKER"):
    # one intra-op thread per xdist worker: 2 workers on 2 cores, no oversubscription
    torch.set_num_threads(1)


class TinySeg(nn.Module):
    """Conv-BN-ReLU x2 + 1x1 conv ``head``: a dense predictor, output [B, num_classes, H, W]."""

    def __init__(self, width: int = 4, num_classes: int = 2, in_ch: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, width, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(width)
        self.head = nn.Conv2d(width, num_classes, 1)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.head(x)


TINY_INPUT = (1, 3, 8, 8)


@pytest.fixture(scope="session")
def make_tiny():
    """``make_tiny(width=8, num_classes=5, seed=0)`` -> a fresh TinyCNN."""
    def make(width: int = 8, num_classes: int = 5, seed: int = 0) -> TinyCNN:
        torch.manual_seed(seed)
        return TinyCNN(width, num_classes)
    return make


@pytest.fixture(scope="session")
def make_tiny_seg():
    """``make_tiny_seg(width=4, num_classes=2, seed=0)`` -> a fresh TinySeg."""
    def make(width: int = 4, num_classes: int = 2, seed: int = 0) -> TinySeg:
        torch.manual_seed(seed)
        return TinySeg(width, num_classes)
    return make


@pytest.fixture(scope="session")
def make_routed(make_tiny):
    """``make_routed(granularity, num_tickets=3, keep=0.5, seed=1, model=None)`` -> a routed TinyCNN
    (output layer ``head``) holding random tickets."""
    def make(granularity: str = "weight", num_tickets: int = 3, keep: float = 0.5, seed: int = 1,
             model: nn.Module | None = None) -> rtl.RoutedModel:
        model = make_tiny() if model is None else model
        routed = rtl.wrap(model, num_tickets, example_inputs=torch.randn(*TINY_INPUT), granularity=granularity,
                          adapter="generic", output_layers=["head"])
        routed.set_tickets(rtl.TicketSet.random(routed.space, num_tickets, keep=keep, seed=seed))
        return routed
    return make


class GroupedCNN(nn.Module):
    """Conv(bias)-BN-ReLU, grouped Conv (groups=2, bias)-BN-ReLU, 1x1 Conv(bias)-BN-ReLU, pool, Linear ``head``.

    Channel groups: ``conv1`` (8, tiled over conv2's 2 channel groups), ``conv2`` (8, tiled), ``conv3`` (16).
    """

    def __init__(self, num_classes: int = 5, in_ch: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.bn2 = nn.BatchNorm2d(8)
        self.conv3 = nn.Conv2d(8, 16, 1)
        self.bn3 = nn.BatchNorm2d(16)
        self.head = nn.Linear(16, num_classes)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        x = torch.relu(self.bn3(self.conv3(x)))
        return self.head(x.mean((2, 3)))


@pytest.fixture(scope="session")
def make_grouped():
    """``make_grouped(num_classes=5, seed=0)`` -> a fresh GroupedCNN."""
    def make(num_classes: int = 5, seed: int = 0) -> GroupedCNN:
        torch.manual_seed(seed)
        return GroupedCNN(num_classes)
    return make


@pytest.fixture(scope="session")
def make_loader():
    """``make_loader(n_batches, batch_size=4, seed=0, num_classes=5, shuffle=False)`` -> a DataLoader of
    ``(x [B, 3, 8, 8], y [B])`` batches from a fixed random TensorDataset (a shuffled one uses a seeded
    generator, so two loaders made with the same arguments yield the same batches)."""
    from torch.utils.data import DataLoader, TensorDataset

    def make(n_batches: int, batch_size: int = 4, seed: int = 0, num_classes: int = 5, shuffle: bool = False):
        g = torch.Generator().manual_seed(seed)
        n = n_batches * batch_size
        ds = TensorDataset(torch.randn(n, *TINY_INPUT[1:], generator=g), torch.randint(0, num_classes, (n,), generator=g))
        gen = torch.Generator().manual_seed(seed + 1000) if shuffle else None
        return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=gen)
    return make


# ---------------------------------------------------------------- benchmark scripts (tests/benchmarks)
# One conftest.py only: the test modules import from `conftest`, and a second one would shadow this one.
BENCHMARKS = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def benchmark_module():
    """``load(name)``: a fresh module object of ``benchmarks/<name>.py`` (the scripts are not a package)."""
    def load(name: str):
        spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    return load


@pytest.fixture
def kaiming_std_ratios():
    """``ratios(model)``: each conv's weight std over the Kaiming-normal std √(2 / fan_in) (1.0 = the paper's θ0,
    1/√6 ≈ 0.41 = PyTorch's default ``U(±1/√fan_in)``)."""
    def ratios(model) -> list[float]:
        return [float(m.weight.detach().std()) / math.sqrt(2.0 / m.weight[0].numel())
                for m in model.modules() if isinstance(m, nn.Conv2d)]
    return ratios
