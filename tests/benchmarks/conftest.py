"""Shared by the benchmark tests: the scripts in ``benchmarks/`` are not a package, so they are loaded by path."""
import importlib.util
import math
import pathlib

import pytest
import torch.nn as nn

BENCHMARKS = pathlib.Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture
def benchmark_module():
    """``load(name)``: a fresh module object of ``benchmarks/<name>.py``."""
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
