"""benchmarks/learned_tickets.py: §11's SmallCNN starts from the paper's Kaiming-normal θ0 by default, and
``init="torch"`` keeps PyTorch's default (the θ0 of §11's earlier table)."""
import importlib.util
import math
import pathlib

import pytest
import torch.nn as nn

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _module():
    spec = importlib.util.spec_from_file_location("learned_tickets", ROOT / "benchmarks" / "learned_tickets.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _std_ratios(model: nn.Module) -> list[float]:
    return [float(m.weight.detach().std()) / math.sqrt(2.0 / m.weight[0].numel())
            for m in model.modules() if isinstance(m, nn.Conv2d)]


def test_small_cnn_default_is_kaiming_and_torch_keeps_pytorchs_init():
    lt = _module()
    kaiming, _ = lt.build_model("cnn", 32, seed=0)
    assert len(_std_ratios(kaiming)) == 4
    assert all(abs(r - 1.0) < 0.2 for r in _std_ratios(kaiming)), _std_ratios(kaiming)
    torch_default, _ = lt.build_model("cnn", 32, seed=0, init="torch")
    assert all(abs(r - 1 / math.sqrt(6)) < 0.08 for r in _std_ratios(torch_default)), _std_ratios(torch_default)
    with pytest.raises(ValueError, match="init must be"):
        lt.SmallCNN(1, 32, init="xavier")
