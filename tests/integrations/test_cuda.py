"""The core guarantees again on a CUDA device (skipped without one; CI has none, the GPU machine runs them).

- routed soft masks == exported subnet, mixed-route batch == each route alone, gradients stay in the ticket
  and per-pixel routes compose (the per-family checks of test_families.py, device="cuda");
- during ticket k's update nothing outside ticket k changes (Adam, momentum + weight decay, per-ticket and
  shared optimizer state);
- the same seed gives the same masks; CUDA and CPU give the same tickets' outputs.
"""
import pytest
import torch

import rtl_plugin as rtl
import test_families as fam
from training.test_training import OPTIMIZERS, StepLog, check_masked_steps, wrap  # tests/ is on sys.path
from rtl_plugin.training import retrain as training
from rtl_plugin.pruning.pruner import RTLPruner

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(autouse=True)
def _exact_float32():
    """TF32 convolutions / matmuls (on by default for cuDNN) round to 10 mantissa bits: off, so routed and
    exported models are compared in true float32."""
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


class OnCuda:
    """Mixin: a test_families family run on the GPU (float32 summation order differs from the CPU's)."""
    device = "cuda"
    tol = 1e-4


class TestCudaTimmResnet18(OnCuda, fam.TestTimmResnet18):
    pass


class TestCudaTimmEfficientNetB0(OnCuda, fam.TestTimmEfficientNetB0):
    pass


class TestCudaSmpUnetResnet18(OnCuda, fam.TestSmpUnetResnet18):
    pass


class TestCudaAudioUNet(OnCuda, fam.TestAudioUNet):
    pass


@pytest.mark.parametrize("opt_name", ["adam", "adamw", "sgd_momentum_wd"])
@pytest.mark.parametrize("per_ticket_state", [True, False])
@pytest.mark.parametrize("granularity", ["weight", "channel"])
def test_cuda_joint_retrain_keeps_non_owned_entries(granularity, per_ticket_state, opt_name, make_tiny, make_grouped,
                                                     make_loader, monkeypatch):
    model = make_tiny() if granularity == "weight" else make_grouped()
    routed = wrap(model, granularity).cuda()
    log = StepLog()
    monkeypatch.setattr(training, "MaskedUpdate", log.cls)
    opt = OPTIMIZERS[opt_name](routed.parameters())
    hist = training.joint_retrain(routed, {k: make_loader(2, seed=k) for k in range(3)}, optimizer=opt, epochs=2,
                                  per_ticket_state=per_ticket_state, device="cuda", progress=False)
    assert hist["steps"] == 12 == len(log.records)
    assert all(v.is_cuda for _, _, after in log.records for v in after.values())
    check_masked_steps(routed, log.records, min_steps=12)


def test_cuda_same_seed_same_masks(make_tiny, make_loader):
    def run():
        torch.manual_seed(123)
        routed = wrap(make_tiny(), "weight").cuda()
        p = RTLPruner(routed, sparsities=[0.25, 0.5], prune_fraction=0.2, progress=False)
        return p.find_tickets({k: make_loader(2, seed=k, shuffle=True) for k in range(3)},
                              optimizer_factory=lambda ps: torch.optim.Adam(ps, lr=1e-2), device="cuda")

    old = torch.backends.cudnn.deterministic
    torch.backends.cudnn.deterministic = True
    try:
        a, b = run(), run()
    finally:
        torch.backends.cudnn.deterministic = old
    for t in a.tickets_at:
        for n in a.tickets_at[t].masks:
            assert torch.equal(a.tickets_at[t].masks[n].cpu(), b.tickets_at[t].masks[n].cpu()), (t, n)


@pytest.mark.parametrize("granularity", ["weight", "channel"])
def test_cuda_matches_cpu(granularity):
    import timm
    torch.manual_seed(0)
    r = rtl.wrap(timm.create_model("resnet18", num_classes=5), 3, granularity=granularity)
    r.set_tickets(rtl.TicketSet.random(r.space, 3, keep=0.6, seed=1))
    r.eval()
    x = torch.randn(6, 3, 32, 32)
    route = torch.tensor(fam.ROUTE)
    with torch.no_grad():
        y_cpu = r(x, route=route)
        r.cuda()
        y_gpu = r(x.cuda(), route=route.cuda())
    assert y_gpu.is_cuda
    assert fam._rel(y_gpu.cpu(), y_cpu) < 1e-4


def test_cuda_learned_router_moved_after_fit():
    from rtl_plugin.routing.routers import create_router
    g = torch.Generator().manual_seed(0)
    x = torch.randn(60, 2, 16, generator=g)
    ids = torch.arange(60) % 3
    x[ids == 1] += 2.0
    router = create_router("learned", num_tickets=3, epochs=20).fit(x, ids)
    on_cpu = router(x)
    router.cuda()
    assert torch.equal(router(x.cuda()).cpu(), on_cpu)


def test_cuda_search_gives_the_cpu_masks_of_the_same_weights(make_tiny, make_loader):
    """Pruning only (no training): the CUDA threshold (a sort on the device) picks the CPU's weights."""
    def search(device):
        routed = wrap(make_tiny(), "weight").to(device)
        p = RTLPruner(routed, sparsities=[0.3, 0.6, 0.9], prune_fraction=0.3, progress=False)
        return p.find_tickets({k: make_loader(1, seed=k) for k in range(3)}, train_step=lambda *a: 0.0,
                              device=device)
    a, b = search("cpu"), search("cuda")
    for t in a.tickets_at:
        for n in a.tickets_at[t].masks:
            assert torch.equal(a.tickets_at[t].masks[n], b.tickets_at[t].masks[n].cpu()), (t, n)
