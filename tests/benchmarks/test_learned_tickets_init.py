"""benchmarks/learned_tickets.py: §11's SmallCNN starts from the paper's Kaiming-normal θ0 by default, and
``init="torch"`` keeps PyTorch's default (the θ0 of §11's earlier table)."""
import math

import pytest


def test_small_cnn_default_is_kaiming_and_torch_keeps_pytorchs_init(benchmark_module, kaiming_std_ratios):
    lt = benchmark_module("learned_tickets")
    kaiming = kaiming_std_ratios(lt.build_model("cnn", 32, seed=0)[0])
    assert len(kaiming) == 4 and all(abs(r - 1.0) < 0.2 for r in kaiming), kaiming
    torch_default = kaiming_std_ratios(lt.build_model("cnn", 32, seed=0, init="torch")[0])
    assert all(abs(r - 1 / math.sqrt(6)) < 0.08 for r in torch_default), torch_default
    with pytest.raises(ValueError, match="init must be"):
        lt.SmallCNN(1, 32, init="xavier")
