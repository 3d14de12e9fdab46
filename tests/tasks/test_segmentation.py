"""Segmentation mosaics with per-class tickets on smp U-Net (rtl_plugin.tasks.segmentation)."""
from __future__ import annotations

import math

import pytest
import torch

import segmentation_models_pytorch  # noqa: F401  ([test] extra: a missing one fails)
import skimage  # noqa: F401  ([test] extra: a missing one fails)

import rtl_plugin as rtl  # noqa: E402
from rtl_plugin.errors import DataError, RouteError, SparsityError  # noqa: E402
from rtl_plugin.tasks.segmentation import (SEG_CLASSES, CompositionClusters, MosaicBatches, SegConfig,  # noqa: E402
                                     SegMosaicDataset, build_unet, class_step, compose_by_route, iou_per_class,
                                     make_seg_mosaic, routed_pixels_step, run_segmentation, self_routes,
                                     soft_compose)


# --------------------------------------------------------------------------- data
def test_mosaic_deterministic_and_labels_are_classes():
    a_img, a_lab = make_seg_mosaic(3, SEG_CLASSES, n_regions=3, size=32)
    b_img, b_lab = make_seg_mosaic(3, SEG_CLASSES, n_regions=3, size=32)
    assert torch.equal(a_img, b_img) and torch.equal(a_lab, b_lab)
    assert a_img.shape == (3, 32, 32) and a_img.dtype == torch.float32
    assert 0 <= float(a_img.min()) and float(a_img.max()) <= 1
    assert a_lab.shape == (32, 32) and a_lab.dtype == torch.int64
    ids = a_lab.unique().tolist()
    assert len(ids) == 3 and all(0 <= i < len(SEG_CLASSES) for i in ids)  # 3 distinct classes of 4
    c_img, c_lab = make_seg_mosaic(4, SEG_CLASSES, n_regions=3, size=32)
    assert not torch.equal(a_img, c_img)


def test_label_map_matches_texture_source():
    """Label k marks exactly the pixels filled from photo ``classes[k]`` (rebuilt from the same generator)."""
    import numpy as np

    from rtl_plugin.tasks.images import region_map, texture
    from rtl_plugin.tasks.segmentation import _photo_source
    img, lab = make_seg_mosaic(5, SEG_CLASSES, n_regions=3, size=32)
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([5, 3, 32, 5150])))
    regions = region_map(rng, 3, 32)
    cls = rng.permutation(len(SEG_CLASSES))[:3]
    assert torch.equal(lab, torch.from_numpy(cls[regions]))
    sk = _photo_source()
    for r, c in enumerate(cls):
        tex = torch.from_numpy(texture(sk, SEG_CLASSES[int(c)], rng, 32).transpose(2, 0, 1)).float()
        sel = (lab == int(c)).expand(3, -1, -1)
        assert torch.allclose(img[sel], tex[sel])


def test_dataset_splits_disjoint_and_subsets():
    tr = SegMosaicDataset(6, 0, SEG_CLASSES[:3], n_regions=2, size=32)
    te = SegMosaicDataset(3, 1000, SEG_CLASSES[:3], n_regions=2, size=32)
    assert not set(tr.seeds) & set(te.seeds)
    assert tr.images.shape == (6, 3, 32, 32) and tr.labels.shape == (6, 32, 32)
    x, y = tr[2]
    img, lab = make_seg_mosaic(2, SEG_CLASSES[:3], n_regions=2, size=32)
    assert torch.equal(x, img) and torch.equal(y, lab)
    for k in range(3):
        idx = tr.contains(k)
        assert all(bool((tr.labels[i] == k).any()) for i in idx.tolist())
        others = sorted(set(range(6)) - set(idx.tolist()))
        assert all(not bool((tr.labels[i] == k).any()) for i in others)
    batches = list(MosaicBatches(tr.images, tr.labels, 4, seed=0))
    assert [b[0].shape[0] for b in batches] == [4, 2]


def test_class_step_is_balanced_one_vs_rest():
    torch.manual_seed(0)
    model = torch.nn.Conv2d(3, 3, 1)
    x = torch.randn(2, 3, 8, 8)
    y = torch.zeros(2, 8, 8, dtype=torch.long)
    y[:, :2] = 1  # class 1: 25% of pixels
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    per = torch.nn.functional.cross_entropy(model(x), y, reduction="none")
    per = per.detach()
    expect = 0.5 * per[y == 1].mean() + 0.5 * per[y != 1].mean()
    assert math.isclose(class_step(1)(model, (x, y), opt), float(expect), rel_tol=1e-5)
    # class absent from the batch: only the negative term
    assert math.isclose(class_step(2)(model, (x, y), opt), float(per.mean()), rel_tol=1e-5)


def test_routed_pixels_step_counts_only_routed_pixels():
    torch.manual_seed(0)
    model = torch.nn.Conv2d(3, 3, 1)
    x = torch.randn(2, 3, 8, 8)
    y = torch.randint(0, 3, (2, 8, 8))
    r = torch.zeros(2, 8, 8, dtype=torch.long)
    r[:, :3] = 2  # ticket 2 owns the first 3 rows, whatever their label
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    per = torch.nn.functional.cross_entropy(model(x), y, reduction="none").detach()
    assert math.isclose(routed_pixels_step(2)(model, (x, y, r), opt), float(per[:, :3].mean()), rel_tol=1e-5)
    assert math.isclose(routed_pixels_step(0)(model, (x, y, r), opt), float(per[:, 3:].mean()), rel_tol=1e-5)
    with pytest.raises(DataError, match="no pixel routed"):
        routed_pixels_step(1)(model, (x, y, r), opt)
    with pytest.raises(DataError, match="routes must have"):
        MosaicBatches(x, y, 2, routes=r[:, :4])
    got = list(MosaicBatches(x, y, 1, seed=0, routes=r))
    assert all(len(b) == 3 and torch.equal(b[2], r[0:1]) for b in got)


def test_self_routes_pick_the_most_confident_own_class_ticket():
    torch.manual_seed(0)
    K, N, H, W = 3, 2, 4, 5
    logits = torch.randn(K, N, K, H, W)
    routes = self_routes(logits)
    own = torch.log_softmax(logits, dim=2)
    for n, h, w in [(0, 0, 0), (1, 3, 4), (0, 2, 1), (1, 1, 3)]:
        assert int(routes[n, h, w]) == max(range(K), key=lambda k: float(own[k, n, k, h, w]))
    # a ticket that is certain of its own class everywhere takes every pixel
    logits[1, :, 1] = 50.0
    assert bool((self_routes(logits) == 1).all())
    comp = compose_by_route(logits, routes)
    assert torch.equal(comp[1, :, 3, 4], logits[int(routes[1, 3, 4]), 1, :, 3, 4])
    with pytest.raises(DataError, match="one class per ticket"):
        self_routes(torch.randn(3, 2, 4, 4, 4))
    with pytest.raises(DataError, match="ticket ids in"):
        compose_by_route(logits, routes + 3)
    with pytest.raises(DataError, match="routes must be an integer tensor"):
        compose_by_route(logits, routes[:, :2])


def test_router_ticket_loss_pipeline():
    """ticket_loss='router': tickets retrained on the router's routes on the training mosaics; the router's
    train accuracy is reported and every RTL row stays a valid mIoU."""
    torch.manual_seed(0)
    res = run_segmentation(SegConfig.quick(ticket_loss="router", methods=("rtl", "single_imp")))
    assert sorted(res["router_train_pixel_acc"]) == [0.5, 0.75]
    assert all(0 < a <= 1 for a in res["router_train_pixel_acc"].values())
    assert all(0 <= v <= 1 for v in res["miou"]["rtl"]["label_free"].values())


def test_iou_per_class():
    t = torch.tensor([0, 0, 1, 1, 2, 2])
    p = torch.tensor([0, 1, 1, 1, 2, 0])
    iou = iou_per_class(p, t, 3)
    assert iou == pytest.approx([1 / 3, 2 / 3, 1 / 2])
    assert iou_per_class(t, t, 4)[:3] == [1.0, 1.0, 1.0] and math.isnan(iou_per_class(t, t, 4)[3])


# --------------------------------------------------------------------------- routing
def test_pixel_routed_output_equals_composed_masked_copies():
    K = 3
    model = build_unet("resnet18", K, seed=0, decoder_channels=(16, 16, 8, 8, 8))
    r = rtl.wrap(model, K)
    r.set_tickets(rtl.TicketSet.random(r.space, K, keep=0.6, seed=1))
    tr = SegMosaicDataset(4, 0, SEG_CLASSES[:3], n_regions=2, size=32)
    x, route = (tr.images - 0.5) / 0.5, tr.labels
    r.train()
    with torch.no_grad():
        for k in range(K):  # per-ticket batch-norm statistics differ
            r(x, route=k)
    r.eval()
    with torch.no_grad():
        y = r(x, route=route)
        expect = torch.zeros_like(y)
        for k in range(K):
            dense = r.plain_copy(k).eval()
            for name, m in r.tickets.masks.items():
                w = dense.get_submodule(name).weight
                w.mul_(m[k].to(w.dtype))
            out = dense(x)
            sel = (route == k).unsqueeze(1).expand_as(y)
            expect[sel] = out[sel]
    assert y.shape == (4, K, 32, 32)
    assert torch.allclose(y, expect, atol=1e-4, rtol=1e-4), float((y - expect).abs().max())


# --------------------------------------------------------------------------- pipeline
@pytest.fixture(scope="module")
def quick_result():
    torch.manual_seed(0)
    return run_segmentation(SegConfig.quick())


def test_pipeline_quick_finite_miou_every_method_and_routing(quick_result):
    m = quick_result["miou"]
    assert set(m) == {"rtl", "single_imp", "multi_imp"}
    routings = {"oracle", "label_free", "self", "soft"}
    assert set(m["rtl"]) == routings and set(m["multi_imp"]) == routings
    for meth, routes in m.items():
        for routing, by_s in routes.items():
            assert sorted(by_s) == [0.5, 0.75], (meth, routing)
            assert all(math.isfinite(v) and 0 <= v <= 1 for v in by_s.values()), (meth, routing, by_s)
    rows = quick_result["rows"]
    assert all(len(r["iou"]) == 3 for r in rows)
    kept = {(r["method"], r["sparsity"]): r["params"] for r in rows}
    n = quick_result["model"]["prunable_weights"]
    # single IMP keeps ~(1 - s) of the weights; multi-IMP holds K models' worth; RTL's union lies in between
    assert kept[("single_imp", 0.75)] == pytest.approx(0.25 * n, rel=0.05)
    assert kept[("single_imp", 0.75)] < kept[("rtl", 0.75)] <= kept[("multi_imp", 0.75)]
    assert all(0 <= a <= 1 for a in quick_result["router_pixel_acc"].values())


def test_pipeline_label_free_route_is_router_prediction(quick_result):
    """Label-free routing uses the single-IMP prediction: with the same masks, the RTL label-free rows differ
    from the oracle rows unless the router is perfect."""
    acc = quick_result["router_pixel_acc"]
    rows = {(r["method"], r["sparsity"], r["routing"]): r for r in quick_result["rows"]}
    for s, a in acc.items():
        assert rows[("single_imp", s, "direct")]["pixel_acc"] == pytest.approx(a)
        if a < 1.0:
            assert rows[("rtl", s, "oracle")]["iou"] != rows[("rtl", s, "label_free")]["iou"] or \
                rows[("rtl", s, "oracle")]["pixel_acc"] != rows[("rtl", s, "label_free")]["pixel_acc"]


# --------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize("kw, err, text", [
    (dict(encoder="resnet50"), DataError, "encoder must be one of"),
    (dict(size=40), DataError, "multiple of 32"),
    (dict(classes=("brick", "nope")), DataError, "unknown or repeated"),
    (dict(sparsities=(0.75, 0.5)), SparsityError, "increasing"),
    (dict(methods=("rtl",)), DataError, "single_imp"),
    (dict(test_first_seed=3), DataError, "disjoint"),
    (dict(n_train=0), DataError, "n_train"),
    (dict(ticket_loss="focal"), DataError, "ticket_loss"),
    (dict(per_ticket_state=1), DataError, "per_ticket_state"),
    (dict(partition="pixels"), DataError, "partition must be"),
    (dict(partition="composition", ticket_loss="router"), DataError, "per-pixel routes"),
    (dict(num_clusters=1, partition="composition"), DataError, "num_clusters"),
    (dict(num_clusters=7, partition="composition"), DataError, r"n_train // 2"),
    (dict(num_clusters=3), DataError, "partition='composition'"),
])
def test_bad_config_raises(kw, err, text):
    with pytest.raises(err, match=text):
        run_segmentation(SegConfig.quick(**kw))


def test_bad_inputs_raise():
    with pytest.raises(DataError, match="SegConfig"):
        run_segmentation({"size": 32})
    with pytest.raises(DataError, match="n_regions"):
        make_seg_mosaic(0, SEG_CLASSES, n_regions=5)
    with pytest.raises(DataError, match="seed"):
        make_seg_mosaic(-1)
    with pytest.raises(DataError, match="logits"):
        iou_per_class(torch.rand(2, 4), torch.zeros(2, 4, dtype=torch.long), 3)
    model = build_unet("resnet18", 3, decoder_channels=(16, 16, 8, 8, 8))
    r = rtl.wrap(model, 3)
    with pytest.raises(RouteError):
        r(torch.zeros(1, 3, 32, 32), route=torch.zeros(1, 32, 32))  # float route


# --------------------------------------------------------------------------- composition tickets, soft routing
def test_composition_clusters_group_mosaics_by_their_classes():
    ds = SegMosaicDataset(40, 0, SEG_CLASSES, n_regions=3, size=32)
    cc = CompositionClusters(4, 4, seed=0).fit(ds.labels)
    assert sum(cc.describe()["sizes"]) == 40 and min(cc.describe()["sizes"]) >= 1
    f = cc.fractions(ds.labels)
    assert f.shape == (40, 4) and abs(f.sum(1) - 1).max() < 1e-6
    # k-means centres are the mean class fractions of their members
    for k, idx in enumerate(cc.subsets()):
        assert abs(f[idx.numpy()].mean(0) - cc.centers[k]).max() < 1e-6
    assert torch.equal(cc.route(ds.labels), cc.assignment)  # the training maps route to their own cluster
    assert torch.equal(CompositionClusters(4, 4, seed=0).fit(ds.labels).assignment, cc.assignment)  # deterministic
    with pytest.raises(DataError, match="not fitted"):
        CompositionClusters(4, 4).route(ds.labels)
    with pytest.raises(DataError, match=r"\[N, H, W\]"):
        cc.route(ds.labels[0])
    with pytest.raises(DataError, match="class ids"):
        cc.route(ds.labels + 4)
    with pytest.raises(DataError, match="lower num_clusters"):
        CompositionClusters(8, 4).fit(ds.labels[:5])
    with pytest.raises(DataError, match="fewer than 2"):  # 12 maps in 11 clusters: at least one singleton
        CompositionClusters(11, 4).fit(ds.labels[:12])
    with pytest.raises(DataError, match=r"fractions must be \[N, 4\]"):
        cc.route_fractions(f[:, :3])
    assert (cc.route_fractions(torch.from_numpy(f)) == cc.assignment.numpy()).all()
    with pytest.raises(DataError, match="seed"):
        CompositionClusters(4, 4, seed=-1)


def test_composition_partition_pipeline_routes_whole_images():
    res = run_segmentation(SegConfig.quick(partition="composition", num_clusters=3, sparsities=(0.5,),
                                           methods=("rtl", "single_imp")))
    assert res["data"]["partition"] == "composition" and res["data"]["tickets"] == 3
    assert set(res["miou"]["rtl"]) == {"oracle", "label_free"}  # no one-vs-rest "self" / per-class "soft"
    assert sum(res["data"]["clusters"]["sizes"]) == SegConfig.quick().n_train
    assert all(math.isfinite(v) for r in res["miou"].values() for by in r.values() for v in by.values())


def test_soft_compose_mixes_tickets_by_router_probabilities():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 2, 4, 5, 5, generator=g)
    onehot = torch.nn.functional.one_hot(torch.randint(0, 3, (2, 5, 5), generator=g), 3).permute(0, 3, 1, 2).float()
    # a one-hot router gives exactly the hard route's class probabilities
    hard = compose_by_route(logits, onehot.argmax(1)).softmax(1)
    assert torch.allclose(soft_compose(logits, onehot), hard, atol=1e-6)
    probs = torch.rand(2, 3, 5, 5, generator=g)
    probs = probs / probs.sum(1, keepdim=True)
    out = soft_compose(logits, probs)
    assert torch.allclose(out.sum(1), torch.ones(2, 5, 5), atol=1e-5)
    want = sum(probs[:, k, None] * logits[k].softmax(1) for k in range(3))
    assert torch.allclose(out, want, atol=1e-6)
    with pytest.raises(DataError, match="route_probs must be probabilities"):
        soft_compose(logits, probs * 2)
    with pytest.raises(DataError, match=r"\[N, K, H, W\]"):
        soft_compose(logits, probs[:, :2])
    with pytest.raises(DataError, match="ticket_logits"):
        soft_compose(logits[0], probs)
    with pytest.raises(DataError, match="move one of them"):
        soft_compose(logits, probs.to("meta"))


def test_mosaic_batches_never_yield_a_single_image():
    x, y = torch.zeros(17, 3, 32, 32), torch.zeros(17, 32, 32, dtype=torch.long)
    batches = MosaicBatches(x, y, 8, seed=0)
    sizes = [b[0].shape[0] for b in batches]
    assert sizes == [8, 9] and len(batches) == 2
    assert [b[0].shape[0] for b in MosaicBatches(x[:16], y[:16], 8)] == [8, 8]
    assert [b[0].shape[0] for b in MosaicBatches(x[:3], y[:3], 1)] == [1, 1, 1]  # asked for single images
    seen = torch.cat([b[0][:, 0, 0, 0] for b in MosaicBatches(torch.arange(17.).view(17, 1, 1, 1).expand(17, 3, 32, 32),
                                                              y, 8, seed=0)])
    assert sorted(seen.tolist()) == list(map(float, range(17)))


def test_run_segmentation_writes_the_stable_results_schema_into_out_dir(tmp_path):
    import json
    torch.manual_seed(0)
    run_segmentation(SegConfig.quick(sparsities=(0.5,), methods=("rtl", "single_imp")), tmp_path / "run")
    on_disk = json.loads((tmp_path / "run" / "results.json").read_text())
    for key in ("task", "dataset", "model", "granularity", "num_tickets", "seed", "device", "rows", "similarity",
                "wall_time_s", "config", "miou"):
        assert key in on_disk, key
    assert {r["routing"] for r in on_disk["rows"] if r["method"] == "rtl"} == {"oracle", "label_free", "self", "soft"}
    assert all(r["metrics"]["miou"] == r["miou"] and 0 <= r["miou"] <= 1 for r in on_disk["rows"])
    assert 0 <= on_disk["similarity"][0]["chance"] <= 1
    assert on_disk["figures"] == ["miou.png"] and (tmp_path / "run" / "miou.png").exists()
