"""The shallow gate (one linear layer + softmax on pooled features) and its joint-training pieces."""
import pytest
import timm
import torch

from rtl_plugin.errors import DataError, RouteError
from rtl_plugin.routing import Gate, create_router, list_routers, load_balance_loss, matched_accuracy, \
    routing_entropy, straight_through_route
from rtl_plugin.routing.routers import flops_share, model_flops


def _domains(n=60, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.arange(n) % 3
    x = torch.randn(n, 3, 8, 8, generator=g) * 0.3
    x[torch.arange(n), ids] += 1.0  # domain k brightens channel k
    return x, ids


def test_gate_is_a_registered_router_with_one_linear_layer():
    assert "gate" in list_routers()
    gate = create_router("gate", num_tickets=3, input_shape=(3, 8, 8))
    assert isinstance(gate, Gate)
    linears = [m for m in gate.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 1 and linears[0].out_features == 3 and linears[0].in_features == 3 * 4 * 4
    x = torch.randn(5, 3, 8, 8)
    assert gate.logits(x).shape == (5, 3)
    torch.testing.assert_close(gate.probs(x).sum(1), torch.ones(5))
    assert gate(x).dtype == torch.long and gate(x).shape == (5,)


def test_gate_fit_routes_separable_domains_and_state_dict_roundtrips():
    x, ids = _domains()
    gate = Gate(3).fit(x, ids, epochs=60)
    assert gate.accuracy(x, ids) == 1.0
    clone = Gate(3, input_shape=(3, 8, 8))
    clone.load_state_dict(gate.state_dict())
    assert torch.equal(clone.eval()(x), gate(x))


def test_gate_errors_name_the_fix():
    gate = Gate(2)
    with pytest.raises(RouteError, match="build"):
        gate(torch.randn(2, 3, 8, 8))
    gate.build((3, 8, 8))
    with pytest.raises(DataError, match="built for inputs"):
        gate(torch.randn(2, 3, 16, 16))
    with pytest.raises(DataError, match="built for inputs"):
        gate.build((1, 8, 8))
    with pytest.raises(DataError, match="float batch"):
        gate(torch.zeros(2, 3, 8, 8, dtype=torch.long))
    with pytest.raises(RouteError, match="ticket_ids"):
        gate.fit(torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 0]))
    with pytest.raises(RouteError, match="pool"):
        Gate(2, pool=0)


def test_gate_flops_are_below_one_percent_of_a_timm_resnet():
    """Measured with torch-pruning's counter: the gate's linear layer and standardisation, plus the pooling adds."""
    model = timm.create_model("resnet18", num_classes=10, pretrained=False).eval()
    x = torch.randn(1, 3, 32, 32)
    gate = Gate(5)
    flops = gate.flops_per_sample((3, 32, 32))
    d = gate.feature_dim((3, 32, 32))
    assert flops >= 2 * d * 5 + 3 * 32 * 32  # linear MACs x2 plus one add per input element
    share = flops_share(gate, model, x)
    assert share == pytest.approx(flops / model_flops(model, x))
    assert 0 < share < 0.01


def test_straight_through_route_value_one_gradient_to_the_chosen_probability():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 3.0, 0.5]], requires_grad=True)
    ids, factor = straight_through_route(logits, gumbel=False)
    assert ids.tolist() == [0, 1]
    assert torch.equal(factor.detach(), torch.ones(2))
    factor.sum().backward()
    p = logits.detach().softmax(1)
    expected = torch.stack([torch.eye(3)[i] - p[r] for r, i in enumerate(ids.tolist())])  # d log p_i / d logits
    torch.testing.assert_close(logits.grad, expected)
    a = straight_through_route(logits, gumbel=True, generator=torch.Generator().manual_seed(3))[0]
    b = straight_through_route(logits, gumbel=True, generator=torch.Generator().manual_seed(3))[0]
    assert torch.equal(a, b)
    with pytest.raises(RouteError, match="tau"):
        straight_through_route(logits, tau=0)


def test_load_balance_and_entropy_terms():
    K = 4
    uniform = torch.full((8, K), 1.0 / K)
    assert float(load_balance_loss(uniform, torch.arange(8) % K)) == pytest.approx(1.0)
    collapsed = torch.zeros(8, K)
    collapsed[:, 2] = 1.0
    assert float(load_balance_loss(collapsed, torch.full((8,), 2))) == pytest.approx(K)
    assert float(routing_entropy(uniform)) == pytest.approx(torch.log(torch.tensor(4.0)).item())
    assert float(routing_entropy(collapsed)) == pytest.approx(0.0, abs=1e-6)
    probs = torch.full((4, K), 0.25, requires_grad=True)
    load_balance_loss(probs, torch.tensor([0, 0, 0, 1])).backward()
    assert probs.grad[0, 0] > probs.grad[0, 1] > probs.grad[0, 2] == 0  # pushes mass off the crowded ticket


def test_matched_accuracy_finds_the_ticket_numbering():
    true = torch.tensor([0, 0, 1, 1, 2, 2])
    pred = torch.tensor([2, 2, 0, 0, 1, 0])
    acc, match = matched_accuracy(pred, true, 3)
    assert acc == pytest.approx(5 / 6) and match == [1, 2, 0]
    with pytest.raises(RouteError, match="integer"):
        matched_accuracy(pred.float(), true, 3)


def test_gate_packages_with_learned_tickets(make_tiny, tmp_path):
    """export_package(router=gate): the loaded package routes with the same gate and the same tickets."""
    import rtl_plugin as rtl
    from torch.utils.data import DataLoader, TensorDataset
    from rtl_plugin.training import learn_tickets
    x, ids = _domains(24)
    y = torch.randint(0, 5, (24,), generator=torch.Generator().manual_seed(1))
    routed = rtl.wrap(make_tiny(), 3, example_inputs=x[:1], granularity="channel", adapter="generic",
                      output_layers=["head"])
    gate = Gate(3)
    with pytest.raises(RouteError, match="no layers"):
        rtl.export_package(routed, tmp_path / "unbuilt", router=gate, example_inputs=x[:2])
    learn_tickets(routed, DataLoader(TensorDataset(x, y, ids), batch_size=8), sparsity=0.4, epochs=2, gate=gate)
    rtl.export_package(routed, tmp_path / "pkg", router=gate, example_inputs=x[:4])
    pkg = rtl.load_package(tmp_path / "pkg", make_tiny())
    assert torch.equal(pkg.router(x), gate(x))
    routed.eval()
    torch.testing.assert_close(pkg(x), routed(x, route=gate(x)), rtol=1e-4, atol=1e-5)
