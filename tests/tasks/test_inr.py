"""Texture mosaics (rtl_plugin.tasks.images) and the region-routed INR (rtl_plugin.tasks.inr)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import skimage  # noqa: F401  ([test] extra: a missing one fails)

import rtl_plugin as rtl  # noqa: E402
from rtl_plugin.errors import DataError, RouteError, SparsityError  # noqa: E402
from rtl_plugin.tasks.images import make_mosaic  # noqa: E402
from rtl_plugin.tasks.inr import (FourierFeatures, INRConfig, INRMLP, pixel_coords, psnr, region_subsets,  # noqa: E402
                            run_inr)


# --------------------------------------------------------------------------- mosaics

def test_mosaic_is_deterministic_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("RTL_CACHE", str(tmp_path / "env_cache"))
    a_img, a_reg, a_src = make_mosaic(3, 5, 32, return_sources=True)  # cache via $RTL_CACHE
    files = list((tmp_path / "env_cache").glob("*.npz"))
    assert len(files) == 1 and not list((tmp_path / "env_cache").glob("*.tmp"))
    b_img, b_reg = make_mosaic(3, 5, 32)  # read back from the cache
    c_img, c_reg, c_src = make_mosaic(3, 5, 32, cache=False, return_sources=True)  # rebuilt from scratch
    for img, reg in ((b_img, b_reg), (c_img, c_reg)):
        assert torch.equal(img, a_img) and torch.equal(reg, a_reg)
    assert a_src == c_src and len(set(a_src)) == 5  # one distinct photo per region
    d_img, _ = make_mosaic(4, 5, 32, cache=False)
    assert not torch.equal(d_img, a_img)


def test_mosaic_region_map_is_exact():
    img, reg, src = make_mosaic(1, 4, 48, cache=False, return_sources=True)
    assert img.shape == (3, 48, 48) and img.dtype == torch.float32
    assert reg.shape == (48, 48) and reg.dtype == torch.long
    assert float(img.min()) >= 0 and float(img.max()) <= 1
    assert sorted(reg.unique().tolist()) == [0, 1, 2, 3]
    assert int(torch.bincount(reg.flatten()).min()) >= 48 * 48 // 16  # no sliver regions
    # exact: replaying the builder's random stream gives the same region map, and inside region k the image
    # equals photo k's crop bit for bit (no blending across a boundary)
    from rtl_plugin.tasks import images as images
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([1, 4, 48, 20261123])))
    regions = images.region_map(rng, 4, 48)
    assert np.array_equal(regions, reg.numpy())
    names = [images.MOSAIC_SOURCES[i] for i in rng.permutation(len(images.MOSAIC_SOURCES))[:4]]
    assert names == src
    sk = images.require_skimage()
    for k, name in enumerate(names):
        tex = torch.from_numpy(images.texture(sk, name, rng, 48).astype(np.float32)).permute(2, 0, 1)
        sel = reg == k
        assert torch.equal(img[:, sel], tex[:, sel])


def test_mosaic_stale_cache_is_rebuilt(tmp_path):
    img, reg = make_mosaic(0, 3, 16, cache_dir=tmp_path)
    (path,) = tmp_path.glob("*.npz")
    path.write_bytes(b"not an npz")
    with pytest.warns(RuntimeWarning, match="unreadable or stale"):
        img2, reg2 = make_mosaic(0, 3, 16, cache_dir=tmp_path)
    assert torch.equal(img, img2) and torch.equal(reg, reg2)
    img3, _ = make_mosaic(0, 3, 16, cache_dir=tmp_path)  # the rewritten cache is valid again
    assert torch.equal(img, img3)


@pytest.mark.parametrize("kw, match", [
    (dict(seed=-1), "seed"), (dict(seed=1.5), "seed"), (dict(seed=True), "seed"),
    (dict(n_regions=2), "n_regions"), (dict(n_regions=9), "n_regions"), (dict(n_regions="4"), "n_regions"),
    (dict(size=8), "size"), (dict(size=64.0), "size"),
])
def test_mosaic_bad_inputs(kw, match):
    args = dict(seed=0, n_regions=4, size=32)
    args.update(kw)
    with pytest.raises(DataError, match=match):
        make_mosaic(**args, cache=False)


# --------------------------------------------------------------------------- encoding, model, routing

def test_fourier_features_shape_and_values():
    enc = FourierFeatures()  # 16 frequencies: 2 + 2*16 = 34
    xy = pixel_coords(5, 7)
    assert xy.shape == (35, 2) and float(xy.min()) == 0 and float(xy.max()) == 1
    assert torch.allclose(xy[6], torch.tensor([1.0, 0.0]))  # row-major: last pixel of the first row is x = 1
    f = enc(xy)
    assert f.shape == (35, 34) and enc.out_features == 34
    assert torch.equal(f[:, :2], xy)
    proj = 2 * math.pi * xy @ enc.B.t()
    assert torch.allclose(f[:, 2:18], torch.sin(proj)) and torch.allclose(f[:, 18:], torch.cos(proj))
    assert torch.equal(FourierFeatures(seed=0).B, enc.B) and not torch.equal(FourierFeatures(seed=1).B, enc.B)
    assert FourierFeatures(num_frequencies=4)(xy).shape == (35, 10)


def test_inr_mlp_is_the_papers_architecture():
    m = INRMLP()
    lin = [l for l in m if isinstance(l, torch.nn.Linear)]
    assert [(l.in_features, l.out_features) for l in lin] == [(34, 128), (128, 128), (128, 128), (128, 128), (128, 3)]
    assert sum(l.weight.numel() for l in lin) == 53_888  # the paper's ~54K weights
    assert m(torch.randn(6, 34)).shape == (6, 3)


def _routed_inr(K=3, seed=0):
    torch.manual_seed(seed)
    mlp = INRMLP(34, 16, 2)
    routed = rtl.wrap(mlp, K, example_inputs=torch.randn(2, 34), output_layers=[])
    g = torch.Generator().manual_seed(seed)
    masks = {n: torch.rand((K,) + tuple(m.shape[1:]), generator=g) > 0.5 for n, m in routed.tickets.masks.items()}
    routed.set_tickets(rtl.TicketSet(routed.space, masks))
    return routed


@pytest.mark.parametrize("grad", [False, True])
def test_routed_inr_equals_masked_dense_copy_per_region(grad):
    K = 3
    routed = _routed_inr(K)
    x = FourierFeatures()(pixel_coords(6, 6))
    regions = torch.arange(36) % K
    regions[:5] = 2  # uneven regions
    with torch.set_grad_enabled(grad):
        out = routed(x, route=regions)
    for k in range(K):
        copy_k = routed.plain_copy(k)
        with torch.no_grad():
            for n in routed.space.layers:
                copy_k.get_submodule(n).weight.mul_(routed.tickets.masks[n][k].float())
            ref = copy_k(x[regions == k])
        assert torch.allclose(out[regions == k].detach(), ref, atol=1e-6), k


def test_per_pixel_routing_runs_each_present_ticket_once():
    """Pixels are batch items: one forward pass per ticket present, over exactly that ticket's pixels."""
    routed = _routed_inr(4)
    x = torch.randn(500, 34)
    regions = torch.randint(0, 3, (500,))  # ticket 3 absent
    seen = []
    h = routed.model[0].register_forward_hook(lambda m, i, o: seen.append(i[0].shape[0]))
    try:
        with torch.no_grad():
            routed(x, route=regions)
    finally:
        h.remove()
    assert seen == [int((regions == k).sum()) for k in range(3)]


def test_region_subsets_and_psnr():
    x = torch.randn(10, 34)
    y = torch.rand(10, 3)
    reg = torch.tensor([0, 1, 1, 2, 0, 2, 2, 1, 0, 0])
    subs = region_subsets(x, y, reg)
    assert sorted(subs) == [0, 1, 2] and all(len(dl) == 1 for dl in subs.values())
    (xb, yb), = list(subs[2])
    assert torch.equal(xb, x[reg == 2]) and torch.equal(yb, y[reg == 2])
    with pytest.raises(DataError, match="region 1 has no pixel"):
        region_subsets(x, y, torch.tensor([0, 2] * 5))
    assert psnr(y + 0.1, y) == pytest.approx(10 * math.log10(1 / float(((y + 0.1).clamp(0, 1) - y).pow(2).mean())))
    assert psnr(y, y) == float("inf")


# --------------------------------------------------------------------------- the experiment

def test_run_inr_quick_pipeline(tmp_path):
    cfg = INRConfig.quick(cache_dir=str(tmp_path / "cache"), figures_dir=str(tmp_path / "fig"))
    res = run_inr(cfg)
    for method in ("rtl", "single_imp"):
        assert sorted(res["psnr"][method]) == [0.5, 0.75]
        assert all(math.isfinite(v) and v > 5 for v in res["psnr"][method].values()), res["psnr"]
    assert math.isfinite(res["psnr"]["dense"])
    rtl_rows = [r for r in res["rows"] if r["method"] == "rtl"]
    assert all(len(r["psnr_per_region"]) == 3 and len(r["per_ticket_params"]) == 3 for r in rtl_rows)
    # each ticket holds (1 - s) of the prunable weights; single IMP too
    n = res["prunable_weights"]["rtl"]
    for r in rtl_rows:
        assert all(abs(p - (1 - r["sparsity"]) * n) <= 1 for p in r["per_ticket_params"])
    cost = res["routing_cost"]
    assert cost["forward_passes"] == cost["regions_present"] == 3 and sum(cost["pixels_per_pass"]) == 24 * 24
    assert res["figures"] and all((tmp_path / "fig").joinpath(p.split("/")[-1]).is_file() for p in res["figures"])
    assert res["reconstructions"][("rtl", 0.5)].shape == (3, 24, 24)
    # budgets: every method sees every pixel the same number of times
    assert res["budget"]["pixel_presentations_retrain"] == cfg.retrain_steps * 24 * 24


def test_run_inr_user_image_and_bad_inputs():
    img = torch.rand(3, 16, 16)
    reg = (torch.arange(16).view(1, 16) >= 8).long().expand(16, 16).clone()
    res = run_inr(INRConfig.quick(methods=("rtl",), sparsities=(0.5,), figure_sparsities=(0.5,)), image=img,
                  regions=reg)
    assert res["image"]["source"] == "user" and res["image"]["region_pixels"] == [128, 128]
    assert set(res["psnr"]) == {"rtl"}
    q = INRConfig.quick
    with pytest.raises(DataError, match="INRConfig"):
        run_inr({"size": 24})
    with pytest.raises(SparsityError):
        run_inr(q(sparsities=(0.75, 0.5)))
    with pytest.raises(SparsityError, match="figure_sparsities"):
        run_inr(q(figure_sparsities=(0.9,)))
    with pytest.raises(DataError, match="methods"):
        run_inr(q(methods=("rtl", "magic")))
    with pytest.raises(DataError, match="single_batches"):
        run_inr(q(single_batches="half"))
    with pytest.raises(DataError, match="search_steps"):
        run_inr(q(search_steps=0))
    with pytest.raises(DataError, match="image"):
        run_inr(q(), image=torch.rand(16, 16), regions=reg)
    with pytest.raises(DataError, match=r"\[0, 1\]"):
        run_inr(q(), image=img * 2, regions=reg)
    with pytest.raises(RouteError, match="integer dtype"):
        run_inr(q(), image=img, regions=reg.float())
    with pytest.raises(RouteError, match="every id present"):
        run_inr(q(), image=img, regions=reg * 2)
    with pytest.raises(DataError, match="without image"):
        run_inr(q(), regions=reg)
    with pytest.raises(DataError, match=r"\[N, 2\]"):
        FourierFeatures()(torch.rand(5, 3))
    with pytest.raises(DataError, match="num_frequencies"):
        FourierFeatures(num_frequencies=0)
    with pytest.raises(DataError, match="scale"):
        FourierFeatures(scale=-1.0)
    with pytest.raises(DataError, match="hidden"):
        INRMLP(hidden=0)
    with pytest.raises(DataError, match="height"):
        pixel_coords(1, 5)


def test_run_inr_multi_imp_trains_each_ticket_alone(tmp_path):
    res = run_inr(INRConfig.quick(methods=("rtl", "multi_imp"), sparsities=(0.5,), figure_sparsities=(0.5,),
                                  cache_dir=str(tmp_path)))
    (row,) = [r for r in res["rows"] if r["method"] == "multi_imp"]
    (rtl_row,) = [r for r in res["rows"] if r["method"] == "rtl"]
    assert math.isfinite(row["psnr"]) and row["params"] == sum(rtl_row["per_ticket_params"])
    with pytest.raises(DataError, match="add 'rtl'"):
        run_inr(INRConfig.quick(methods=("multi_imp",)))


# --------------------------------------------------------------------------- joint retraining modes

def test_summed_retrain_sums_owner_gradients_and_freezes_unowned():
    """One summed step = one SGD step on the sum over tickets of (n_k / N) x region k's MSE gradient, each
    restricted to ticket k's mask; weights no ticket owns never move (also with Adam)."""
    from rtl_plugin.tasks.inr import summed_retrain
    K = 3
    routed = _routed_inr(K)
    x = FourierFeatures()(pixel_coords(6, 6))
    y = torch.rand(36, 3)
    regions = torch.arange(36) % K
    regions[:6] = 0
    names = list(routed.space.layers)
    w0 = {n: routed.prunable_weights()[n].detach().clone() for n in names}
    # expected gradient, ticket by ticket
    expected = {n: torch.zeros_like(w0[n]) for n in names}
    for k in range(K):
        routed.zero_grad(set_to_none=True)
        sel = regions == k
        (torch.nn.functional.mse_loss(routed(x[sel], route=k), y[sel]) * float(sel.float().mean())).backward()
        for n in names:
            g = routed.prunable_weights()[n].grad
            assert bool((g[~routed.tickets.masks[n][k].expand_as(g)] == 0).all())  # a non-owner adds nothing
            expected[n] += g
    routed.zero_grad(set_to_none=True)
    full = {k: v.detach().clone() for k, v in routed.model.state_dict().items()}
    losses = summed_retrain(routed, x, y, regions, optimizer=torch.optim.SGD(routed.parameters(), lr=0.1), epochs=1)
    assert len(losses) == 1 and math.isfinite(losses[0])
    for n in names:
        assert torch.allclose(routed.prunable_weights()[n].detach(), w0[n] - 0.1 * expected[n], atol=1e-6), n
    # Adam, several epochs: entries outside the union of the masks are bit-identical, owned ones moved
    routed.model.load_state_dict(full)
    summed_retrain(routed, x, y, regions, optimizer=torch.optim.Adam(routed.parameters(), lr=1e-2), epochs=5)
    moved = 0
    for n in names:
        w = routed.prunable_weights()[n].detach()
        union = routed.tickets.masks[n].any(0).expand_as(w)
        assert torch.equal(w[~union], w0[n][~union])
        moved += int((w[union] != w0[n][union]).sum())
    assert moved > 0.9 * sum(int(routed.tickets.masks[n].any(0).expand_as(w0[n]).sum()) for n in names)
    with pytest.raises(DataError, match="epochs"):
        summed_retrain(routed, x, y, regions, optimizer=torch.optim.Adam(routed.parameters()), epochs=-1)
    with pytest.raises(DataError, match="one row per pixel"):
        summed_retrain(routed, x, y[:5], regions, optimizer=torch.optim.Adam(routed.parameters()), epochs=1)


@pytest.mark.parametrize("mode", ["mixed", "sequential", "sequential_shared"])
def test_run_inr_retrain_modes(tmp_path, mode):
    cfg = INRConfig.quick(methods=("rtl",), retrain_mode=mode, cache_dir=str(tmp_path))
    res = run_inr(cfg)
    assert all(math.isfinite(v) and v > 5 for v in res["psnr"]["rtl"].values())
    steps = res["budget"]["optimizer_steps_retrain"]
    assert steps["rtl_mode"] == mode
    assert steps["rtl_total"] == cfg.retrain_steps * (1 if mode == "mixed" else 3)
    assert res["budget"]["pixel_presentations_retrain"] == cfg.retrain_steps * 24 * 24  # same for every mode
    with pytest.raises(DataError, match="retrain_mode"):
        run_inr(INRConfig.quick(retrain_mode="parallel"))


def test_run_inr_writes_the_stable_results_schema_into_out_dir(tmp_path):
    import json
    res = run_inr(INRConfig.quick(sparsities=(0.5,), figure_sparsities=(0.5,), cache_dir=str(tmp_path / "cache")),
                  tmp_path / "run")
    on_disk = json.loads((tmp_path / "run" / "results.json").read_text())
    for key in ("task", "dataset", "model", "granularity", "num_tickets", "seed", "device", "rows", "similarity",
                "wall_time_s", "config"):
        assert key in on_disk, key
    assert {(r["method"], r["sparsity"]) for r in on_disk["rows"]} == {("rtl", 0.5), ("single_imp", 0.5), ("dense", 0.0)}
    assert all(r["metrics"]["psnr"] == r["psnr"] and r["matching"] == "equal_cost" for r in on_disk["rows"])
    assert on_disk["figures"] and all((tmp_path / "run" / f).exists() for f in on_disk["figures"])
    assert "reconstructions" in res and "reconstructions" not in on_disk
