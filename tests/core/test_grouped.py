"""Grouped execution (rtl_plugin.grouped, RoutedModel(execution=...)): one call per masked layer for all tickets
present equals the bucketed path (one masked forward per ticket) for the three model families, mixed / uneven /
per-pixel routes, train and eval mode, routed and shared norms, outputs, running statistics and gradients."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from torch.profiler import ProfilerActivity, profile

import rtl_plugin as rtl
from rtl_plugin.errors import ExecutionError, RouteError
from rtl_plugin.grouped import GroupLayout

K = 3
EVAL_ROUTE = [0, 2, 2, 0, 1, 2, 0]   # uneven buckets (3 / 1 / 3), a single-sample bucket
TRAIN_ROUTE = [2, 0, 2, 0, 0, 0, 2]  # ticket 1 absent, uneven (4 / 3)


def _families():
    import segmentation_models_pytorch as smp
    import timm
    from rtl_plugin.integrations.audio import AudioUNet
    return {
        "timm_test_resnet": (lambda: timm.create_model("test_resnet", num_classes=5), lambda b: torch.randn(b, 3, 32, 32)),
        "timm_test_efficientnet": (lambda: timm.create_model("test_efficientnet", num_classes=5),
                                   lambda b: torch.randn(b, 3, 32, 32)),
        "smp_unet": (lambda: smp.Unet("resnet18", encoder_weights=None, encoder_depth=3, decoder_channels=(16, 8, 8),
                                      classes=2), lambda b: torch.randn(b, 3, 32, 32)),
        "audio_unet": (lambda: AudioUNet(n_fft=256, hop_length=64), lambda b: torch.randn(b, 2048)),
    }


def _pair(model: nn.Module, x1: torch.Tensor, **kw):
    """(bucketed, grouped) float64 copies of one weight-mode routed model with random tickets and per-ticket
    norm statistics."""
    r = rtl.wrap(model, K, example_inputs=x1, granularity="weight", **kw)
    r.set_tickets(rtl.TicketSet.random(r.space, K, keep=0.6, seed=1))
    r.double().train()
    with torch.no_grad():
        xs = torch.randn(6, *x1.shape[1:], dtype=torch.float64)
        r(xs, route=torch.arange(6) % K)  # ticket-specific running statistics
    b, g = copy.deepcopy(r), copy.deepcopy(r)
    b.execution, g.execution = "bucketed", "grouped"
    return b, g


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-9) -> bool:
    a, b = a.detach(), b.detach()
    return bool((a - b).abs().max() <= tol * max(1.0, float(b.abs().max())))


@pytest.mark.parametrize("family", ["timm_test_resnet", "timm_test_efficientnet", "smp_unet", "audio_unet"])
def test_grouped_equals_bucketed_eval_and_train(family):
    make_model, make_input = _families()[family]
    torch.manual_seed(0)
    b, g = _pair(make_model(), make_input(1))
    assert g.grouped_blocker is None
    x = make_input(len(EVAL_ROUTE)).double()
    b.eval(), g.eval()
    with torch.no_grad():
        assert _close(g(x, route=torch.tensor(EVAL_ROUTE)), b(x, route=torch.tensor(EVAL_ROUTE)))
    # train mode: outputs, gradients and the running statistics after the step
    b.train(), g.train()
    route = torch.tensor(TRAIN_ROUTE)
    yb, yg = b(x, route=route), g(x, route=route)
    assert _close(yg, yb)
    (yb.square().mean()).backward()
    (yg.square().mean()).backward()
    for (n, pb), pg in zip(b.named_parameters(), g.parameters()):
        assert (pb.grad is None) == (pg.grad is None), n
        if pb.grad is not None:
            assert _close(pg.grad, pb.grad), n
    for (n, sb), sg in zip(b.named_buffers(), g.buffers()):
        assert torch.equal(sb, sg) if not sb.is_floating_point() else _close(sg, sb, 1e-12), n
    b.eval(), g.eval()  # the statistics moved: eval normalisation kept from the first eval call must follow
    with torch.no_grad():
        assert _close(g(x, route=torch.tensor(EVAL_ROUTE)), b(x, route=torch.tensor(EVAL_ROUTE)))


def test_grouped_per_pixel_routes_equal_bucketed(make_tiny_seg):
    b, g = _pair(make_tiny_seg(), torch.randn(1, 3, 8, 8))
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    pix = torch.zeros(3, 8, 8, dtype=torch.long)
    pix[0, :, 4:] = 2
    pix[1] = 1
    pix[2, :3] = 2
    for train in (False, True):
        b.train(train), g.train(train)
        with torch.no_grad():
            assert _close(g(x, route=pix), b(x, route=pix))
    for (n, sb), sg in zip(b.named_buffers(), g.buffers()):
        assert _close(sg.double(), sb.double(), 1e-12), n


@pytest.mark.parametrize("train", [False, True])
def test_grouped_shared_norm_equals_bucketed(make_tiny, train):
    b, g = _pair(make_tiny(), torch.randn(1, 3, 8, 8), adapter="generic", output_layers=["head"], shared_norm=True)
    b.train(train), g.train(train)
    x = torch.randn(7, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        assert _close(g(x, route=torch.tensor(TRAIN_ROUTE)), b(x, route=torch.tensor(TRAIN_ROUTE)))
    for (n, sb), sg in zip(b.named_buffers(), g.buffers()):
        assert _close(sg.double(), sb.double(), 1e-12), n
    assert int(b.model.bn1.num_batches_tracked) == (5 if train else 3)  # once per ticket bucket (3 + 2)


def test_grouped_momentum_none_cumulative_average(make_tiny):
    model = make_tiny()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None
    b, g = _pair(model, torch.randn(1, 3, 8, 8), adapter="generic", output_layers=["head"])
    x = torch.randn(7, 3, 8, 8, dtype=torch.float64)
    for _ in range(2):
        with torch.no_grad():
            b(x, route=torch.tensor(TRAIN_ROUTE)), g(x, route=torch.tensor(TRAIN_ROUTE))
    for (n, sb), sg in zip(b.named_buffers(), g.buffers()):
        assert _close(sg.double(), sb.double(), 1e-12), n


class _Branches(nn.Module):
    """Every grouped layer branch: Conv1d with reflect padding, ConvTranspose1d, a bias-free Linear on tokens
    [B, N, C], a Conv3d and a Linear with bias (all prunable; ``head`` is the output layer)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(2, 6, 3, padding=1, padding_mode="reflect")
        self.bn = nn.BatchNorm1d(6)
        self.up = nn.ConvTranspose1d(6, 4, 4, stride=2, padding=1)
        self.tok = nn.Linear(4, 8, bias=False)
        self.vol = nn.Conv3d(1, 2, 3, padding=1)
        self.mix = nn.Linear(8 + 2, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        h = self.up(torch.relu(self.bn(self.conv(x))))               # [B, 4, 2L]
        t = self.tok(h.transpose(1, 2)).mean(1)                       # [B, 2L, 4] -> [B, 8]
        v = self.vol(x[:, :1, :8].reshape(-1, 1, 2, 2, 2)).mean((2, 3, 4))  # [B, 2]
        return self.head(torch.relu(self.mix(torch.cat([t, v], 1))))


@pytest.mark.parametrize("train", [False, True])
def test_grouped_layer_branches(train):
    torch.manual_seed(0)
    b, g = _pair(_Branches(), torch.randn(1, 2, 8), adapter="generic", output_layers=["head"])
    assert set(g.space.layers) == {"conv", "up", "tok", "vol", "mix"}  # every branch really runs grouped
    b.train(train), g.train(train)
    x = torch.randn(7, 2, 8, dtype=torch.float64, requires_grad=True)
    yb, yg = b(x, route=torch.tensor(TRAIN_ROUTE)), g(x, route=torch.tensor(TRAIN_ROUTE))
    assert _close(yg, yb)
    gb, = torch.autograd.grad(yb.sum(), x)
    gg, = torch.autograd.grad(yg.sum(), x)
    assert _close(gg, gb)


def test_grouped_under_cpu_bf16_autocast_matches_bucketed(make_routed):
    r = make_routed("weight", num_tickets=K).eval()
    x, route = torch.randn(6, 3, 8, 8), torch.tensor([0, 1, 2, 2, 1, 0])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        r.execution = "bucketed"
        yb = r(x, route=route)
        r.execution = "grouped"
        yg, yg2 = r(x, route=route), r(x, route=route)  # the second call uses the cached bf16 stack
    assert ("stack", torch.bfloat16) in r._cache and r._cache[("stack", torch.bfloat16)][1]["conv1"].dtype == torch.bfloat16
    assert yg.dtype == yb.dtype and torch.equal(yg, yg2)
    assert float((yg.float() - yb.float()).abs().max()) <= 0.05 * float(yb.float().abs().max())


def _instance_forwards(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if "forward" in m.__dict__]


def test_model_unchanged_after_grouped_forward_and_after_an_error(make_routed):
    r = make_routed("weight", num_tickets=K)
    r.execution = "grouped"
    state = {k: v.clone() for k, v in r.state_dict().items()}
    r.eval()
    with torch.no_grad():
        y = r(torch.randn(5, 3, 8, 8), route=torch.tensor([0, 1, 2, 1, 0]))
    assert y.shape == (5, 5) and _instance_forwards(r.model) == []
    with pytest.raises(RuntimeError):  # wrong channel count: fails inside the first grouped conv
        r(torch.randn(5, 4, 8, 8), route=torch.tensor([0, 1, 2, 1, 0]))
    assert _instance_forwards(r.model) == [] and r._state.route is None and r._state.layout is None
    assert all(torch.equal(v, r.state_dict()[k]) for k, v in state.items())
    x, route = torch.randn(5, 3, 8, 8), torch.tensor([0, 1, 2, 1, 0])
    with torch.no_grad():  # still routes correctly afterwards
        y_grouped = r(x, route=route)
        r.execution = "bucketed"
        assert torch.allclose(y_grouped, r(x, route=route), atol=1e-6)


def _conv_calls(fn) -> int:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key == "aten::convolution")


def test_profiler_one_conv_call_per_layer_grouped_k_bucketed(make_routed):
    r = make_routed("weight", num_tickets=K).eval()
    n_convs = sum(isinstance(m, nn.Conv2d) for m in r.model.modules())
    x, route = torch.randn(6, 3, 8, 8), torch.tensor([0, 1, 2, 2, 1, 0])
    with torch.no_grad():
        r.execution = "grouped"
        assert _conv_calls(lambda: r(x, route=route)) == n_convs
        r.execution = "bucketed"
        assert _conv_calls(lambda: r(x, route=route)) == K * n_convs
        r.execution = "auto"  # CPU: the bucketed path (grouping is not faster on the CPU)
        assert _conv_calls(lambda: r(x, route=route)) == K * n_convs


def test_execution_switch_validation(make_routed):
    r = make_routed("weight")
    assert r.execution == "auto"
    for bad in ("fast", None, 1, "Grouped"):
        with pytest.raises(ExecutionError, match="execution must be one of"):
            r.execution = bad
    for bad in (-1, 1.5, "3"):
        with pytest.raises(ExecutionError, match="cache_masked_weights"):
            r.cache_masked_weights = bad

    class OwnConv(nn.Conv2d):
        def forward(self, x):
            return super().forward(x) * 1.0

    torch.manual_seed(0)
    model = nn.Sequential(OwnConv(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    with pytest.raises(ExecutionError, match="OwnConv.*bucketed"):
        rtl.wrap(model, 2, example_inputs=torch.randn(1, 3, 8, 8), adapter="generic", output_layers=["3"],
                 execution="grouped")
    r2 = rtl.wrap(model, 2, example_inputs=torch.randn(1, 3, 8, 8), adapter="generic", output_layers=["3"])
    assert "OwnConv" in r2.grouped_blocker and r2.execution == "auto"
    assert r2(torch.randn(3, 3, 8, 8), route=torch.tensor([0, 1, 1])).shape == (3, 2)  # auto falls back


def test_grouped_layout_pads_in_sample_major_order():
    lay = GroupLayout(torch.tensor([2, 0, 2, 2]))
    assert lay.tickets == [0, 2] and lay.counts == [1, 3] and lay.bmax == 3 and lay.padded_batch == 6
    x = torch.arange(4.0).view(4, 1) + 1
    p = lay.pad(x)
    assert p.view(3, 2).tolist() == [[2.0, 1.0], [0.0, 3.0], [0.0, 4.0]]  # row b * T + j
    assert torch.equal(lay.unpad(p), x) and lay.valid.tolist() == [[True, True], [False, True], [False, True]]
    with pytest.raises(RouteError, match="bucketed"):
        lay.unpad(torch.zeros(5))


@pytest.mark.parametrize("execution", ["bucketed", "grouped"])
def test_bounded_cache_holds_at_most_n_copies_and_follows_changes(make_routed, execution):
    r = make_routed("weight", num_tickets=K).eval()
    ref = copy.deepcopy(r)
    ref.cache_masked_weights = False
    r.cache_masked_weights, r.execution, ref.execution = 2, execution, execution
    x, route = torch.randn(6, 3, 8, 8), torch.tensor([0, 1, 2, 2, 1, 0])
    with torch.no_grad():
        for step in range(3):
            assert torch.allclose(r(x, route=route), ref(x, route=route), atol=1e-6)
            assert sum(e[2] for e in r._cache.values()) <= 2
            for a in (r, ref):  # a weight change (an optimizer step) and a mask change
                a.prunable_weights()["conv1"].add_(0.1)
                masks = {n: m[1].clone() for n, m in a.tickets.masks.items()}
                masks["conv1"][0] = ~masks["conv1"][0]
                a.set_ticket(1, masks)
    assert all(e[2] == 1 for e in r._cache.values())  # a bound < K caches single tickets, never the K stack
    r.cache_masked_weights = 0
    assert len(r._cache) == 0
    r.cache_masked_weights = True
    with torch.no_grad():
        r(x, route=route)
    assert (("stack", None) in r._cache) == (execution == "grouped")


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture
def no_tf32():
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


@needs_cuda
@pytest.mark.parametrize("family", ["timm_test_resnet", "timm_test_efficientnet", "smp_unet", "audio_unet"])
def test_cuda_grouped_equals_bucketed_and_auto_groups(family, no_tf32):
    make_model, make_input = _families()[family]
    torch.manual_seed(0)
    b, g = _pair(make_model(), make_input(1))
    b.cuda().eval(), g.cuda().eval()
    g.execution = "auto"
    assert g.execution_on("cuda") == "grouped" and g.execution_on("cpu") == "bucketed"
    x, route = make_input(len(EVAL_ROUTE)).double().cuda(), torch.tensor(EVAL_ROUTE).cuda()
    with torch.no_grad():
        assert _close(g(x, route=route), b(x, route=route))
    b.float(), g.float()  # float32 on the GPU (TF32 off): summation order only
    with torch.no_grad():
        assert _close(g(x.float(), route=route), b(x.float(), route=route), 1e-4)
    b.train(), g.train()
    route = torch.tensor(TRAIN_ROUTE).cuda()
    yb, yg = b(x.float(), route=route), g(x.float(), route=route)
    assert _close(yg, yb, 1e-4)
    yb.square().mean().backward()
    yg.square().mean().backward()
    for (n, pb), pg in zip(b.named_parameters(), g.parameters()):
        if pb.grad is not None:
            assert _close(pg.grad, pb.grad, 1e-3), n


@needs_cuda
def test_cuda_grouped_one_conv_per_layer_and_bounded_cache_memory(make_routed):
    r = make_routed("weight", num_tickets=K).cuda().eval()
    n_convs = sum(isinstance(m, nn.Conv2d) for m in r.model.modules())
    x, route = torch.randn(6, 3, 8, 8, device="cuda"), torch.tensor([0, 1, 2, 2, 1, 0], device="cuda")
    with torch.no_grad():
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            r(x, route=route)
        assert sum(e.count for e in prof.key_averages() if e.key == "aten::convolution") == n_convs
        r(x, route=route)
        assert ("stack", None) in r._cache  # the K-ticket stack, cached
        r.cache_masked_weights = 0
        assert len(r._cache) == 0
        y0 = r(x, route=route)
        assert len(r._cache) == 0
        r.cache_masked_weights = True
        assert torch.allclose(r(x, route=route), y0, atol=1e-5)
