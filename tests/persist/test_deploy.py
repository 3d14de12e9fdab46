"""Deployable packages: slim tickets == routed tickets, mixed batches, routers, ONNX == PyTorch, bad inputs,
and the fast weight-mode path (cached masked weights, autocast)."""
from __future__ import annotations

import json
import pathlib

import pytest
import torch

import rtl_plugin as rtl
from rtl_plugin.persist.package import (MANIFEST, PACKAGE_VERSION, SlimRoutedModel, export_onnx, export_package, load_package,
                               onnx_run, package_size)
from rtl_plugin.routing.routers import create_router
from _helpers import TinyCNN, half_tickets

K = 3
ROUTE = torch.tensor([0, 1, 2, 2, 1, 0, 0, 2])


def _rel(a, b) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12))


def _routed(granularity: str, seed: int = 0) -> rtl.RoutedModel:
    """A routed TinyCNN with tickets and per-ticket BN statistics moved away from init (differently per ticket)."""
    torch.manual_seed(seed)
    r = rtl.wrap(TinyCNN(), K, example_inputs=torch.randn(1, 3, 8, 8), granularity=granularity, adapter="generic",
                 output_layers=["head"])
    r.set_tickets(half_tickets(r.space, K, seed=seed + 1) if granularity == "channel"
                  else rtl.TicketSet.random(r.space, K, keep=0.5, seed=seed + 1))
    g = torch.Generator().manual_seed(seed)
    r.train()
    with torch.no_grad():
        for _ in range(3):
            x = torch.randn(6, 3, 8, 8, generator=g)
            x[1::3] = x[1::3] * 3 + 1
            r(x, route=torch.tensor([0, 1, 2, 0, 1, 2]))
    return r.eval()


def _x(n: int = len(ROUTE), seed: int = 5) -> torch.Tensor:
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def _fresh() -> TinyCNN:
    torch.manual_seed(123)  # other init than the trained model: everything must come from the package
    return TinyCNN()


@pytest.fixture(scope="module", params=["channel", "weight"])
def package(request, tmp_path_factory):
    """(routed, folder, router) with a fitted learned router (channel mode also with ONNX files)."""
    r = _routed(request.param)
    xs = _x(30, seed=9)
    ids = torch.arange(30) % K
    xs[ids == 1] += 2.0
    router = create_router("learned", num_tickets=K, epochs=30).fit(xs, ids)
    folder = tmp_path_factory.mktemp(f"pkg_{request.param}")
    export_package(r, folder, router=router, onnx=request.param == "channel")
    return r, folder, router


def test_package_equals_routed_mixed_batch(package):
    r, folder, _ = package
    slim = load_package(folder, _fresh())
    assert isinstance(slim, SlimRoutedModel) and not slim.training and slim.num_tickets == K
    x = _x()
    with torch.no_grad():
        want = r(x, route=ROUTE)
        got = slim(x, route=ROUTE)
        assert got.shape == want.shape
        assert _rel(got, want) < 1e-5
        for k in range(K):  # each ticket alone, and an int route
            idx = (ROUTE == k).nonzero().flatten()
            assert _rel(slim(x[idx], route=k), r(x[idx], route=k)) < 1e-5
            assert _rel(got[idx], slim(x[idx], route=k)) < 1e-5


def test_channel_tickets_are_physically_smaller(package):
    r, folder, _ = package
    slim = load_package(folder, _fresh())
    if r.granularity != "channel":
        assert slim.routed is not None and slim.tickets is None
        return
    n_full = sum(p.numel() for p in r.model.parameters())
    m = json.loads((folder / MANIFEST).read_text())
    for k in range(K):
        n = sum(p.numel() for p in slim.ticket_module(k).parameters())
        assert n < 0.6 * n_full
        assert m["tickets"][k]["params"] == n
        assert m["tickets"][k]["history"] == rtl.pruning_history(r, k)
    # each slim ticket carries its own BN statistics: ticket k's running stats at its kept channels
    keep = r.tickets.layer_channel_masks()["bn1"]["out"]
    for k in range(K):
        want = r.model.bn1.running_mean[k][keep[k]]
        assert torch.equal(slim.ticket_module(k).bn1.running_mean, want)
    assert not torch.equal(r.model.bn1.running_mean[0], r.model.bn1.running_mean[1])


def test_router_in_package(package):
    r, folder, router = package
    slim = load_package(folder, _fresh())
    x = _x(12, seed=11)
    with torch.no_grad():
        assert torch.equal(slim.router(x), router(x))
        assert _rel(slim(x), r(x, route=router(x))) < 1e-5


def test_manifest_and_files(package):
    r, folder, _ = package
    m = json.loads((folder / MANIFEST).read_text())
    assert m["format"] == "rtl-plugin-package" and m["format_version"] == PACKAGE_VERSION
    assert m["num_tickets"] == K and m["granularity"] == r.granularity and m["fingerprint"] == r.space.fingerprint
    assert m["router"]["name"] == "learned"
    for f in folder.rglob("*"):  # no pickle anywhere: JSON, safetensors, ONNX protobuf only
        if f.is_file():
            assert f.suffix in (".json", ".safetensors", ".onnx"), f
    assert package_size(folder) > 0


def test_onnx_files_match_pytorch(package):
    r, folder, router = package
    if r.granularity != "channel":  # weight packages serve the routed model; ONNX: test_export_onnx_weight_ticket
        assert not list(folder.glob("ticket_*.onnx"))
        return
    import onnxruntime  # noqa: F401  ([test] extra: a missing one fails)
    slim = load_package(folder, _fresh())
    x = _x(5, seed=3)  # another batch size than the export: dynamic batch axis
    with torch.no_grad():
        for k in range(K):
            (y,) = onnx_run(folder / f"ticket_{k}.onnx", [x])
            assert _rel(y, slim.ticket_module(k)(x)) < 1e-5
        (ids,) = onnx_run(folder / "router.onnx", [x])
        assert torch.equal(ids, router(x))


def test_export_onnx_weight_ticket(tmp_path):
    import onnxruntime  # noqa: F401  ([test] extra: a missing one fails)
    r = _routed("weight")
    plain = rtl.export_ticket(r, 1).eval()
    info = export_onnx(plain, tmp_path / "t1.onnx", _x(2), check_inputs=_x(7))
    assert info["max_rel_err"] < 1e-5
    (y,) = onnx_run(tmp_path / "t1.onnx", [_x(4)])
    with torch.no_grad():
        assert _rel(y, r(_x(4), route=1)) < 1e-5


def test_onnx_rejects_routed_model(tmp_path):
    r = _routed("weight")
    with pytest.raises(rtl.SpaceError, match="export each ticket"):
        export_onnx(r, tmp_path / "r.onnx", _x(2))
    with pytest.raises(TypeError):
        export_onnx("model", tmp_path / "r.onnx", _x(2))
    with pytest.raises(rtl.RTLError, match="example_inputs"):
        export_onnx(TinyCNN(), tmp_path / "r.onnx", [1, 2])


def test_package_on_timm_resnet18(tmp_path):
    """timm resnet18 (residual couplings): package == routed soft masks, ONNX tickets == PyTorch."""
    import timm
    import onnxruntime  # noqa: F401  ([test] extra: a missing one fails)
    torch.manual_seed(0)
    r = rtl.wrap(timm.create_model("resnet18", num_classes=4), 2, example_inputs=torch.randn(1, 3, 32, 32),
                 granularity="channel")
    r.set_tickets(half_tickets(r.space, 2))
    r.train()
    with torch.no_grad():
        r(torch.randn(8, 3, 32, 32), route=torch.tensor([0, 1] * 4))
    r.eval()
    export_package(r, tmp_path / "pkg", onnx=True)
    slim = load_package(tmp_path / "pkg", timm.create_model("resnet18", num_classes=4))
    x = torch.randn(6, 3, 32, 32)
    route = torch.tensor([1, 0, 1, 1, 0, 0])
    with torch.no_grad():
        assert _rel(slim(x, route=route), r(x, route=route)) < 1e-5
        for k in range(2):
            (y,) = onnx_run(tmp_path / "pkg" / f"ticket_{k}.onnx", [x])
            assert _rel(y, r(x, route=k)) < 1e-5


def test_context_and_run_all_routers(tmp_path):
    r = _routed("channel")
    export_package(r, tmp_path / "ctx", router=create_router("context", num_tickets=K))
    slim = load_package(tmp_path / "ctx", _fresh())
    x = _x()
    with torch.no_grad():
        assert _rel(slim(x, context=ROUTE), r(x, route=ROUTE)) < 1e-5
    with pytest.raises(rtl.RouteError, match="context"):
        slim(x)
    with pytest.raises(rtl.RouteError, match="not both"):
        slim(x, route=ROUTE, context=ROUTE)
    from rtl_plugin.routing.routers import RunAllRouter
    torch.manual_seed(0)  # one-vs-rest detectors: 2 logits per ticket
    det = rtl.wrap(TinyCNN(num_classes=2), K, example_inputs=torch.randn(1, 3, 8, 8), granularity="channel",
                   adapter="generic", output_layers=["head"])
    det.set_tickets(half_tickets(det.space, K))
    det.eval()
    export_package(det, tmp_path / "all", router=RunAllRouter(K, model=det))
    slim = load_package(tmp_path / "all", TinyCNN(num_classes=2))
    with torch.no_grad():
        ids = RunAllRouter(K, model=det)(x)
        assert torch.equal(slim.router(x), ids)
        assert _rel(slim(x), det(x, route=ids)) < 1e-5


def test_per_pixel_routes_on_slim_package(tmp_path, make_tiny_seg):
    seg = make_tiny_seg(width=4, num_classes=2)
    r = rtl.wrap(seg, 2, example_inputs=torch.randn(1, 3, 8, 8), granularity="channel", adapter="generic",
                 output_layers=["head"])
    r.set_tickets(half_tickets(r.space, 2))
    r.eval()
    export_package(r, tmp_path / "seg")
    torch.manual_seed(0)
    slim = load_package(tmp_path / "seg", make_tiny_seg(width=4, num_classes=2, seed=3))
    x = torch.randn(3, 3, 8, 8)
    pix = torch.zeros(3, 8, 8, dtype=torch.long)
    pix[:, :, 4:] = 1
    pix[2] = 1
    with torch.no_grad():
        assert _rel(slim(x, route=pix), r(x, route=pix)) < 1e-5


# --------------------------------------------------------------------------- bad inputs
def test_bad_inputs(package, tmp_path):
    r, folder, _ = package
    slim = load_package(folder, _fresh())
    x = _x()
    with pytest.raises(rtl.RouteError, match="out of range|outside"):
        slim(x, route=torch.full((len(ROUTE),), K))
    with pytest.raises(rtl.RouteError, match="integer dtype"):
        slim(x, route=ROUTE.float())
    with pytest.raises(rtl.ArchitectureMismatchError, match="another architecture"):
        load_package(folder, TinyCNN(width=4))
    with pytest.raises(rtl.ArchitectureMismatchError, match="fresh"):
        load_package(folder, r)
    with pytest.raises(TypeError):
        export_package(TinyCNN(), tmp_path / "x")
    with pytest.raises(rtl.RouteError, match="not fitted"):
        export_package(r, tmp_path / "y", router=create_router("learned", num_tickets=K))
    with pytest.raises(rtl.RouteError, match="tickets"):
        export_package(r, tmp_path / "z", router=create_router("context", num_tickets=K + 1))
    with pytest.raises(rtl.CorruptFileError, match="rtl.load"):
        r.save(tmp_path / "run")
        load_package(tmp_path / "run", _fresh())


def _copy(src: pathlib.Path, dst: pathlib.Path) -> pathlib.Path:
    for f in src.rglob("*"):
        if f.is_file():
            out = dst / f.relative_to(src)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(f.read_bytes())
    return dst


def test_damaged_package(package, tmp_path):
    r, folder, _ = package
    bad = _copy(folder, tmp_path / "bad")
    target = next(f for f in sorted(bad.rglob("*.safetensors")))
    target.write_bytes(target.read_bytes()[:-7])
    with pytest.raises(rtl.CorruptFileError, match="checksum|truncated|damaged"):
        load_package(bad, _fresh())
    newer = _copy(folder, tmp_path / "newer")
    m = json.loads((newer / MANIFEST).read_text())
    m["format_version"] = PACKAGE_VERSION + 1
    (newer / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(rtl.FormatVersionError, match="upgrade"):
        load_package(newer, _fresh())
    with pytest.raises(rtl.CorruptFileError, match="does not exist"):
        load_package(tmp_path / "nothing", _fresh())


def test_atomic_export_leaves_no_temp_files(tmp_path):
    export_package(_routed("channel"), tmp_path / "p", onnx=False)
    assert not [f for f in (tmp_path / "p").iterdir() if f.name.startswith(".")]


# --------------------------------------------------------------------------- fast routed inference
def test_weight_cache_reused_and_invalidated():
    r = _routed("weight")
    x = _x()
    with torch.no_grad():
        y1 = r(x, route=ROUTE)
        cached = {t: v[1] for t, v in r._cache.items()}
        assert len(cached) == K
        r(x, route=ROUTE)
        assert all(r._cache[t][1] is cached[t] for t in cached)  # no re-masking on a second call
        r.model.conv1.weight.mul_(2.0)  # an in-place weight change invalidates the cache
        y2 = r(x, route=ROUTE)
    assert not torch.allclose(y1, y2)
    assert all(r._cache[t][1] is not cached[t] for t in cached)


def test_weight_mode_autocast_bf16_cpu():
    r = _routed("weight")
    x = _x()
    with torch.no_grad():
        y = r(x, route=ROUTE)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            yb = r(x, route=ROUTE)
            yb2 = r(x, route=ROUTE)
    assert yb.dtype == torch.bfloat16
    assert torch.equal(yb, yb2)
    assert _rel(yb, y) < 0.05
    assert any(key[1] == torch.bfloat16 for key in r._cache)
    assert r._cache[(0, torch.bfloat16)][1]["conv1.weight"].dtype == torch.bfloat16


def test_channel_mixed_batch_autocast_bf16_cpu(package):
    r, folder, _ = package
    x = _x()
    slim = load_package(folder, _fresh())
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        yr = r(x, route=ROUTE)
        ys = slim(x, route=ROUTE)
    with torch.no_grad():
        y = r(x, route=ROUTE)
    assert _rel(yr, y) < 0.05 and _rel(ys, y) < 0.05


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_package_on_cuda(package):
    r, folder, _ = package
    slim = load_package(folder, _fresh(), map_location="cuda")
    x = _x().cuda()
    with torch.no_grad():
        y = slim(x, route=ROUTE.cuda())
        with torch.autocast("cuda", dtype=torch.float16):
            yh = slim(x, route=ROUTE.cuda())
    with torch.no_grad():
        want = r(_x(), route=ROUTE)
    assert _rel(y.cpu(), want) < 1e-4 and _rel(yh.float().cpu(), want) < 0.05


def test_readme_deployment_block_runs(tmp_path, monkeypatch):
    """The README's Deployment snippet runs as written (on test_resnet and stand-in data)."""
    import re
    import timm
    import onnxruntime  # noqa: F401  ([test] extra: a missing one fails)
    text = (pathlib.Path(__file__).resolve().parents[2] / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", text.split("## Deployment", 1)[1], re.S).group(1)
    code = code.replace('"resnet18"', '"test_resnet"')
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    routed = rtl.wrap(timm.create_model("test_resnet", num_classes=22), 3, example_inputs=torch.randn(1, 3, 32, 32),
                      granularity="channel")
    routed.set_tickets(half_tickets(routed.space, 3))
    routed.eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 3, 32, 32, generator=g)
    env = {"rtl": rtl, "timm": timm, "routed": routed, "x": x, "domain_ids": torch.tensor([0, 1, 2, 2, 1, 0]),
           "x_train": torch.cat([x, x + 1.0, x - 1.0]), "domain_train": torch.arange(3).repeat_interleave(6)}
    exec(compile(code, "README.md", "exec"), env)
    with torch.no_grad():
        assert _rel(env["logits"], routed(x, route=env["domain_ids"])) < 1e-5
    assert (tmp_path / "pkg" / "ticket_2.onnx").is_file() and (tmp_path / "t0.onnx").is_file()


def test_centroid_router_package_and_onnx(tmp_path):
    import onnxruntime  # noqa: F401  ([test] extra: a missing one fails)
    r = _routed("channel")
    xs = _x(30, seed=9)
    ids = torch.arange(30) % K
    xs[ids == 2] -= 2.0
    router = create_router("centroid", num_tickets=K).fit(xs, ids)
    export_package(r, tmp_path / "p", router=router, onnx=True)
    slim = load_package(tmp_path / "p", _fresh())
    (got,) = onnx_run(tmp_path / "p" / "router.onnx", [xs])
    with torch.no_grad():
        assert torch.equal(slim.router(xs), router(xs)) and torch.equal(got, router(xs))
        assert _rel(slim(xs), r(xs, route=router(xs))) < 1e-5
