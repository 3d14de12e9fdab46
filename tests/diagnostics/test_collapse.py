"""Collapse diagnostics: the sweep recorder, CollapseMonitor, semantic alignment, the report."""
import json
import math
import os

import pytest
import torch

import rtl_plugin as rtl
from rtl_plugin.training.retrain import default_train_step
from rtl_plugin.diagnostics.collapse import CollapseMonitor
from rtl_plugin.diagnostics.similarity import chance_jaccard, jaccard_per_band, jaccard_per_layer
from rtl_plugin.pruning.pruner import RTLPruner
from rtl_plugin.diagnostics.semantic import semantic_alignment, spearman, wordnet_similarity
from rtl_plugin.diagnostics.sweep import Sweep, SweepPoint, SweepRecorder

EX = torch.randn(1, 3, 8, 8)


def wrap(model, K=3):
    return rtl.wrap(model, K, example_inputs=EX, granularity="weight", adapter="generic", output_layers=["head"])


# ----------------------------------------------------------------------------- 1. similarity properties


def _brute_jaccard(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.reshape(-1).tolist(), b.reshape(-1).tolist()
    inter = sum(1 for x, y in zip(a, b) if x and y)
    union = sum(1 for x, y in zip(a, b) if x or y)
    return 1.0 if union == 0 else inter / union


@pytest.mark.parametrize("keep", [0.1, 0.5, 0.9])
def test_jaccard_matches_brute_force_globally_per_layer_and_band(make_tiny, keep):
    routed = wrap(make_tiny())
    ts = rtl.TicketSet.random(routed.space, 3, keep=keep, seed=5)
    em = ts.element_masks()
    flat = [torch.cat([em[n][k].reshape(-1) for n in em]) for k in range(3)]
    j = ts.jaccard()
    per_layer = jaccard_per_layer(ts)
    for a in range(3):
        for b in range(3):
            assert float(j[a, b]) == pytest.approx(_brute_jaccard(flat[a], flat[b]), abs=1e-12)
            for n in em:
                assert float(per_layer[n][a, b]) == pytest.approx(_brute_jaccard(em[n][a], em[n][b]), abs=1e-12)
    for band, m in jaccard_per_band(ts, 2).items():
        assert torch.allclose(m, m.T) and torch.all(m.diagonal() == 1)


def test_chance_level_formula():
    for p, q in [(0.5, 0.5), (0.1, 0.9), (0.03, 0.05)]:
        assert chance_jaccard(p, q) == pytest.approx(p * q / (p + q - p * q))
    # Monte Carlo agreement
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(200_000, generator=g) < 0.2, torch.rand(200_000, generator=g) < 0.3
    assert _brute_jaccard(a, b) == pytest.approx(chance_jaccard(0.2, 0.3), abs=0.005)


# ----------------------------------------------------------------------------- 2. the monitor on constructed curves


def _points(values: list[float], sparsities: list[float] | None = None, band: str = "deep") -> list[SweepPoint]:
    sp = sparsities or [1 - 0.7 ** i for i in range(len(values))]
    return [SweepPoint(round=i, sparsity=s, ticket_sparsity=[s, s], mean_jaccard=v, chance=0.0,
                       band_jaccard={"shallow": 0.9, band: v}, band_density={}, layer_jaccard={},
                       layer_density={"conv": 1 - s}, min_layer_density=1 - s)
            for i, (s, v) in enumerate(zip(sp, values))]


def test_monitor_fires_on_a_step_up_or_down():
    down = [1.0, 0.95, 0.9, 0.86, 0.82, 0.78, 0.40, 0.35]
    w = CollapseMonitor().scan(_points(down))
    assert w is not None and w.round == 6 and 0.5 < w.confidence <= 1
    assert any("deep" in r for r in w.reasons)
    up = [1.0, 0.95, 0.9, 0.86, 0.82, 0.78, 0.99, 0.99]
    w = CollapseMonitor().scan(_points(up))
    assert w is not None and w.round == 6


def test_monitor_silent_on_flat_and_slow_drift():
    assert CollapseMonitor().scan(_points([0.8] * 12)) is None
    xs = [1 - 0.7 ** i for i in range(12)]
    drift = [1.0 - 0.04 * (-math.log(1 - x)) for x in xs]  # steady change per log-density unit
    assert CollapseMonitor().scan(_points(drift)) is None
    curved = [1.0 - 0.03 * (-math.log(1 - x)) ** 1.3 for x in xs]  # slowly accelerating
    assert CollapseMonitor().scan(_points(curved)) is None


def test_monitor_is_online_consistent_and_uses_the_sparsity_axis():
    vals = [1.0, 0.95, 0.9, 0.86, 0.82, 0.78, 0.40, 0.35]
    pts = _points(vals)
    mon = CollapseMonitor()
    assert [mon.check(pts[:i]) is not None for i in range(1, 7)] == [False] * 6
    assert mon.check(pts[:7]) is not None
    # the same drop spread over a 10x larger log-density step is a normal change, not a step
    sp = [1 - 0.7 ** i for i in range(6)] + [1 - 0.7 ** 5 * 0.7 ** 10]
    assert CollapseMonitor(signals=["band_jaccard"]).scan(_points(vals[:7], sp)) is None


def test_monitor_bottleneck_rule_and_validation():
    pts = _points([0.8] * 8)
    w = CollapseMonitor(min_density=0.1).scan(pts)
    assert w is not None and pts[w.round].min_layer_density < 0.1 <= pts[w.round - 1].min_layer_density
    for bad in [dict(signals=[]), dict(signals="band_jaccard"), dict(factor=1.0), dict(min_change=-1),
                dict(warmup=0), dict(min_density=2.0), dict(action="explode")]:
        with pytest.raises(rtl.RTLError):
            CollapseMonitor(**bad)
    with pytest.raises(rtl.RTLError, match="unknown signal"):
        CollapseMonitor(signals=["nope"]).scan(pts)


# ----------------------------------------------------------------------------- 3. the recorder and the pruner


def _search(make_tiny, make_loader, callbacks, targets=(0.3, 0.6, 0.8), probe=True):
    torch.manual_seed(0)
    routed = wrap(make_tiny())
    subsets = {k: make_loader(2, seed=k, shuffle=True) for k in range(3)}
    rec = [c for c in callbacks if isinstance(c, SweepRecorder)]
    p = RTLPruner(routed, sparsities=list(targets), prune_fraction=0.3, order="round", callbacks=callbacks,
                  progress=False)
    res = p.find_tickets(subsets, optimizer_factory=lambda ps: torch.optim.Adam(ps, lr=1e-2),
                         train_step=default_train_step())
    return routed, res, rec


def test_recorder_points_and_signals(make_tiny, make_loader):
    probe = torch.randn(16, 3, 8, 8)
    rec = SweepRecorder(probe=probe, metric=lambda m, k: 0.5 + 0.1 * k)
    routed, res, _ = _search(make_tiny, make_loader, [rec])
    pts = rec.sweep.points
    rounds = max(h.round for h in res.history)
    assert len(pts) == rounds + 1 and pts[0].sparsity == 0 and pts[0].mean_jaccard == 1.0
    assert [p.round for p in pts] == list(range(rounds + 1))
    for p, t in zip(pts[1:], [h.sparsity for h in res.history if h.ticket == 0]):
        assert p.ticket_sparsity[0] == pytest.approx(t)
    final = res.tickets_at[0.8]
    assert pts[-1].mean_jaccard == pytest.approx(_offdiag(final.jaccard()))
    assert set(pts[-1].band_jaccard) == {"shallow", "middle", "deep"} or len(pts[-1].band_jaccard) >= 1
    for prev, p in zip(pts, pts[1:]):
        # IMP masks are nested: churn = fraction of the previous mask pruned this round
        kept_prev, kept = 1 - prev.sparsity, 1 - p.sparsity
        assert p.mask_churn == pytest.approx(1 - kept / kept_prev, abs=1e-6)
        assert 0 <= p.allocation_churn <= 1 and 0 <= p.prune_agreement <= 1
    for p in pts[:-1]:  # trained signals for every point but the last
        assert p.metric == pytest.approx([0.5, 0.6, 0.7]) and 0 <= p.round_agreement <= 1 if p.round else True
        assert -1 <= p.output_similarity <= 1
    assert pts[-1].metric is None and pts[-1].output_similarity is None
    # JSON round trip
    d = json.loads(json.dumps(rec.sweep.to_dict()))
    back = Sweep.from_dict(d)
    assert [vars(p) for p in back.points] == [vars(p) for p in rec.sweep.points]
    with pytest.raises(rtl.RTLError):
        Sweep.from_dict({"format": "other"})
    with pytest.raises(rtl.RTLError, match="newer"):
        Sweep.from_dict({**d, "format_version": 99})


def _offdiag(j):
    K = j.shape[0]
    return float((j.sum() - j.diagonal().sum()) / (K * (K - 1)))


def test_monitor_callback_stops_and_restores_last_healthy_masks(make_tiny, make_loader):
    # reference sweep without a monitor
    ref_routed, ref, _ = _search(make_tiny, make_loader, [])
    # bottleneck rule at a density the reference reaches only at its last targets
    mon = CollapseMonitor(signals=["mean_jaccard"], factor=1e9, min_density=0.25, action="stop")
    routed, res, _ = _search(make_tiny, make_loader, [mon])
    assert len(mon.warnings) == 1
    w = mon.warnings[0]
    healthy = mon.sweep.points[-1]
    assert healthy.min_layer_density >= 0.25 and w.sparsity > healthy.sparsity
    assert mon.sweep.events[0]["action"] == "stop"
    assert mon.sweep.events[0]["restored_sparsity"] == pytest.approx(healthy.sparsity)
    final = routed.tickets
    assert float(final.sparsity().mean()) == pytest.approx(healthy.sparsity)
    # every target beyond the healthy point got the last healthy masks
    for t in (0.6, 0.8):
        if t > healthy.sparsity + 1e-9:
            for n in final.masks:
                assert torch.equal(res.tickets_at[t].masks[n], final.masks[n])
    # the healthy masks are exactly the reference search's masks at that round (same seed, same data)
    ref_sp = sorted({round(h.sparsity, 9) for h in ref.history})
    assert any(abs(s - healthy.sparsity) < 1e-9 for s in ref_sp)
    assert min(routed.tickets.element_masks()[n].reshape(3, -1).float().mean(1).min().item()
               for n in routed.space.layers) >= 0.25


def test_monitor_relax_goes_on_with_smaller_steps(make_tiny, make_loader):
    mon = CollapseMonitor(signals=["mean_jaccard"], factor=1e9, min_density=0.25, action="relax")
    routed, res, _ = _search(make_tiny, make_loader, [mon])
    assert 1 <= len(mon.warnings) <= 3  # at most max_relaxations (2) relaxations, then a stop
    assert all(e["action"] == "relax" for e in mon.sweep.events)
    steps = [b.sparsity - a.sparsity for a, b in zip(mon.sweep.points, mon.sweep.points[1:])]
    assert min(steps) < max(steps)  # halved prune fraction after the first relaxation


def test_warn_only_changes_nothing(make_tiny, make_loader):
    _, ref, _ = _search(make_tiny, make_loader, [])
    mon = CollapseMonitor(signals=["mean_jaccard"], factor=1e9, min_density=0.25, action="warn")
    _, res, _ = _search(make_tiny, make_loader, [mon])
    assert mon.warnings and not res.stopped
    for t in ref.tickets_at:
        for n in ref.tickets_at[t].masks:
            assert torch.equal(ref.tickets_at[t].masks[n], res.tickets_at[t].masks[n])


def test_recorder_validates():
    with pytest.raises(rtl.RTLError):
        SweepRecorder(probe=[1, 2])
    with pytest.raises(rtl.RTLError):
        SweepRecorder(metric=3)
    with pytest.raises(rtl.RTLError):
        SweepRecorder(predict="argmax")
    with pytest.raises(rtl.TicketError):
        SweepRecorder(n_bands=0)
    with pytest.raises(rtl.RTLError, match="nothing to undo"):
        SweepRecorder().undo_last()


# ----------------------------------------------------------------------------- 4. semantic alignment


def test_spearman_matches_scipy():
    import scipy.stats as scipy_stats
    g = torch.Generator().manual_seed(1)
    a = torch.rand(30, generator=g)
    b = a + 0.5 * torch.rand(30, generator=g)
    a[3] = a[4]  # a tie
    rho, p = spearman(a, b)
    ref = scipy_stats.spearmanr(a.numpy(), b.numpy())
    assert rho == pytest.approx(ref.statistic, abs=1e-12) and p == pytest.approx(ref.pvalue, rel=1e-6)
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3])[0])
    with pytest.raises(rtl.RTLError):
        spearman([1, 2], [1, 2, 3])


def test_semantic_alignment_perfect_and_validated(make_tiny):
    routed = wrap(make_tiny(), K=4)
    ts = rtl.TicketSet.random(routed.space, 4, keep=0.5, seed=3)
    al = semantic_alignment(ts, ts.jaccard())
    assert al["global"]["rho"] == pytest.approx(1.0) and al["global"]["pairs"] == 6
    al = semantic_alignment(ts, -ts.jaccard().double())
    assert al["global"]["rho"] == pytest.approx(-1.0)
    with pytest.raises(rtl.RTLError, match="symmetric"):
        semantic_alignment(ts, torch.arange(16.0).reshape(4, 4))
    with pytest.raises(rtl.RTLError, match=r"\[4, 4\]"):
        semantic_alignment(ts, torch.eye(3))
    with pytest.raises(rtl.TicketError):
        semantic_alignment("masks", torch.eye(4))


def test_wordnet_similarity_or_clear_error(tmp_path):
    with pytest.raises(rtl.MissingDependencyError, match="apt-get install wordnet-base"):
        wordnet_similarity(["shirt", "boot"], data_dir=tmp_path)
    try:
        S = wordnet_similarity(["tee_shirt", "shirt", "sandal", "sneaker", "bag"])
    except rtl.MissingDependencyError:
        if os.environ.get("CI"):
            pytest.fail("WordNet data missing in CI: .ci/run installs Debian's wordnet-base")
        pytest.skip("WordNet data missing: apt-get install wordnet-base (CI installs it and requires this test)")
    assert torch.allclose(S, S.T) and torch.all(S.diagonal() == 1)
    assert S[0, 1] == pytest.approx(0.5)  # a tee shirt IS-A shirt: one hypernym edge
    assert S[0, 1] > S[0, 2] and S[2, 3] > S[2, 4]  # shirts closer to shirts, shoes to shoes
    with pytest.raises(rtl.RTLError, match="not a WordNet noun"):
        wordnet_similarity(["shirt", "qwxzv"])
    with pytest.raises(rtl.RTLError, match="senses"):
        wordnet_similarity(["shirt#7", "boot"])


# ----------------------------------------------------------------------------- 5. report


def test_report_on_a_tiny_run(tmp_path, make_tiny, make_loader):
    rec = SweepRecorder(probe=torch.randn(8, 3, 8, 8))
    routed, res, _ = _search(make_tiny, make_loader, [rec])
    run = tmp_path / "run"
    for t, ts in res.tickets_at.items():
        routed.set_tickets(ts)
        routed.save(run / "tickets" / f"sparsity_{int(round(t * 100)):02d}", extra={"sparsity": t})
    rec.sweep.save(run / "sweep.json")
    (run / "results.json").write_text(json.dumps({"ticket_names": ["cat", "dog", "car"], "rows": []}))
    from rtl_plugin.cli import main
    assert main(["diagnose", str(run), "--class-similarity", str(_write_sim(tmp_path))]) == 0
    out = run / "diagnostics"
    for f in ("report.md", "report.html", "diagnostics.json", "sweep.png", "jaccard_bands_80.png",
              "dendrogram_80.png", "layer_density_80.png"):
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
    md = (out / "report.md").read_text()
    assert "Sparsity sweep" in md and "Similarity per sparsity" in md
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 4 and "<table>" in html
    data = json.loads((out / "diagnostics.json").read_text())
    assert [e["sparsity"] for e in data["per_sparsity"]] == [0.3, 0.6, 0.8]
    assert "semantic_alignment" in data["per_sparsity"][0]
    assert data["sweep_points"] == len(rec.sweep.points)
    # a folder without tickets or sweep is refused with a clear message
    (tmp_path / "empty").mkdir()
    assert main(["diagnose", str(tmp_path / "empty")]) == 2


def _write_sim(tmp_path):
    f = tmp_path / "sim.json"
    f.write_text(json.dumps([[1, 0.8, 0.1], [0.8, 1, 0.1], [0.1, 0.1, 1]]))
    return f


def test_depletion_rule_fires_when_a_layer_empties_faster_than_the_model():
    sp = [1 - 0.7 ** i for i in range(9)]
    pts = _points([0.8] * 9, sp)
    for p in pts:  # a layer that thins out exactly as fast as the model: silent
        p.layer_density = {"a": 1 - p.sparsity, "b": 1.0}
        p.min_layer_density = 1 - p.sparsity
    assert CollapseMonitor().scan(pts) is None
    for i, p in enumerate(pts):  # from round 6 on layer "a" loses density 3x faster (log scale)
        d = (1 - p.sparsity) if i < 6 else (1 - pts[5].sparsity) * (0.7 ** (3 * (i - 5)))
        p.layer_density = {"a": d, "b": 1.0}
        p.min_layer_density = d
    w = CollapseMonitor().scan(pts)
    assert w is not None and w.round == 6 and "layer depletion" in w.reasons[0] and "(a)" in w.reasons[0]
    assert CollapseMonitor(depletion_slope=None).scan(pts) is None
    assert CollapseMonitor(depletion_slope=4.0).scan(pts) is None
    for i, p in enumerate(pts):  # 1.9x faster from round 6 on: the default (1.8) fires, the old 2.0 did not
        d = (1 - p.sparsity) if i < 6 else (1 - pts[5].sparsity) * (0.7 ** (1.9 * (i - 5)))
        p.layer_density = {"a": d, "b": 1.0}
        p.min_layer_density = d
    assert CollapseMonitor().depletion_slope == 1.8
    assert CollapseMonitor().scan(pts).round == 6
    assert CollapseMonitor(depletion_slope=2.0).scan(pts) is None
    with pytest.raises(rtl.RTLError, match="depletion_slope"):
        CollapseMonitor(depletion_slope=0.5)
