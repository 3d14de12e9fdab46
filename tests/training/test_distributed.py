"""Ticket-synchronous data parallelism: 2 CPU processes (gloo, 127.0.0.1) against 1 process, same global batch.

One 2-process run of ``_dist_worker.scenario`` (ticket search with checkpoints, joint retraining with a
resume) feeds most tests; the test process runs the same scenario without a process group as reference.
"""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import rtl_plugin as rtl
from rtl_plugin import distributed as D
from rtl_plugin.errors import DataError, DistributedError
from rtl_plugin.pruning.pruner import RTLPruner
from rtl_plugin.training.retrain import joint_retrain

import _dist_worker as W
from _helpers import TinyCNN

TESTS_DIR = Path(__file__).resolve().parents[1]  # tests/: _dist_worker.py, _helpers.py


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "GLOO_SOCKET_IFNAME": "lo",
           "PYTHONPATH": os.pathsep.join([str(TESTS_DIR), os.environ.get("PYTHONPATH", "")])}
    env.update(extra)
    return env


def _launch(args_of_rank, env_of_rank=None, timeout=120):
    procs = [subprocess.Popen([sys.executable, *args_of_rank(r)], env=_env(**(env_of_rank(r) if env_of_rank else {})),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=timeout))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (o, e) in zip(procs, outs):
        assert p.returncode == 0, f"rank exited with {p.returncode}\nstdout:\n{o}\nstderr:\n{e[-4000:]}"
    return outs


@pytest.fixture(scope="module")
def dist_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    port, cli_port = _free_port(), _free_port()
    torchrun_env = lambda r: {"RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2",  # noqa: E731
                              "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(cli_port)}
    _launch(lambda r: [str(TESTS_DIR / "_dist_worker.py"), str(r), "2", str(port), str(out)], torchrun_env)
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]
    return out, ranks


@pytest.fixture(scope="module")
def ref_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    res = W.scenario(out)
    res["channel"] = W.channel_scenario(out)
    res["mixed"] = W.mixed_scenario(out)
    return res


def _assert_masks_equal(a, b):
    assert sorted(a) == sorted(b)
    for t in a:
        assert sorted(a[t]) == sorted(b[t])
        for n in a[t]:
            assert torch.equal(a[t][n], b[t][n]), (t, n)


def test_masks_and_weights_identical_on_both_ranks(dist_run):
    _, (r0, r1) = dist_run
    _assert_masks_equal(r0["masks"], r1["masks"])
    for key in ("after_search", "final"):
        for n in r0[key]:
            assert torch.equal(r0[key][n], r1[key][n]), (key, n)  # bit-identical, not just close
    assert r0["search_loss"] == r1["search_loss"] and r0["retrain_loss"] == r1["retrain_loss"]


def test_two_processes_equal_one_process(dist_run, ref_run):
    _, (r0, _) = dist_run
    _assert_masks_equal(r0["masks"], ref_run["masks"])
    assert len(r0["search_loss"]) == len(ref_run["search_loss"]) == 4 and r0["steps"] == ref_run["steps"]
    for key in ("after_search", "final"):
        for n, ref in ref_run[key].items():
            got = r0[key][n]
            assert got.dtype == ref.dtype
            if ref.is_floating_point():
                scale = float(ref.abs().max().clamp_min(1e-3))
                assert float((got - ref).abs().max()) <= 1e-6 * scale, (key, n)
            else:
                assert torch.equal(got, ref), (key, n)  # num_batches_tracked per ticket
    # the retraining moved the weights, so the comparison is not trivially of untouched tensors
    assert float((ref_run["final"]["conv1.weight"] - ref_run["after_search"]["conv1.weight"]).abs().max()) > 1e-3
    # losses: rank means weighted by shard share reproduce the global-batch mean (ticket 0 has unequal shards)
    assert r0["search_loss"] == pytest.approx(ref_run["search_loss"], rel=1e-9)
    for a, b in zip(r0["retrain_loss"], ref_run["retrain_loss"]):
        assert a == pytest.approx(b, rel=1e-6)


def _assert_state_close(got_state, ref_state, rtol=1e-6):
    for n, ref in ref_state.items():
        got = got_state[n]
        if ref.is_floating_point():
            scale = float(ref.abs().max().clamp_min(1e-3))
            assert float((got - ref).abs().max()) <= rtol * scale, n
        else:
            assert torch.equal(got, ref), n


def test_channel_granularity_two_processes_equal_one(dist_run, ref_run):
    _, (r0, r1) = dist_run
    _assert_masks_equal(r0["channel"]["masks"], r1["channel"]["masks"])
    _assert_masks_equal(r0["channel"]["masks"], ref_run["channel"]["masks"])
    for n in r0["channel"]["final"]:
        assert torch.equal(r0["channel"]["final"][n], r1["channel"]["final"][n]), n
    _assert_state_close(r0["channel"]["final"], ref_run["channel"]["final"])
    sp = {n: float(m.float().mean()) for n, m in r0["channel"]["masks"][0.5].items()}
    assert all(v < 1.0 for v in sp.values())  # channels were really pruned


def test_mixed_route_retrain_two_processes_equal_one(dist_run, ref_run):
    """mixed_route_retrain under torchrun: ranks stay bit-identical, match one process (global-batch norm
    statistics, shard-weighted losses), and resume from rank 0's checkpoint with the sampler's generator."""
    out, (r0, r1) = dist_run
    m0, m1, ref = r0["mixed"], r1["mixed"], ref_run["mixed"]
    for n in m0["final"]:
        assert torch.equal(m0["final"][n], m1["final"][n]), n
    _assert_state_close(m0["final"], ref["final"])
    assert float((ref["final"]["conv1.weight"] - ref["before"]["conv1.weight"]).abs().max()) > 1e-3  # it trained
    assert m0["loss"] == m1["loss"] and m0["loss"] == pytest.approx(ref["loss"], rel=1e-6)
    assert m0["steps"] == ref["steps"] == 2 * 4 and m0["epochs_seen"] == ref["epochs_seen"] == [0, 1]
    assert (out / "mixed" / "mixed_retrain.json").is_file()
    # global batches of 5, 5, 5, 3 per epoch (the resumed run trains epoch 2 only): each rank got its shard
    assert ref["sizes"] == [5, 5, 5, 3] * 2 and m0["sizes"] == [3, 3, 3, 2] * 2 and m1["sizes"] == [2, 2, 2, 1] * 2


def test_search_resumes_after_a_crash_on_every_rank(dist_run, ref_run):
    _, ranks = dist_run
    for r in ranks:
        assert r["crashed"]
        before, resumed = r["search_steps"]
        # before the crash: ticket 0's two rounds (2 x 3 batches) + ticket 1's crashed round (2 batches);
        # the resumed search re-runs only ticket 1's two rounds, from the checkpoint rank 0 wrote
        assert before == 6 + 2 and resumed == 2 * 2
    assert ranks[0]["search_steps"] == ref_run["search_steps"]


def test_per_ticket_norm_statistics_synchronised(dist_run, ref_run):
    _, (r0, r1) = dist_run
    for name in ("bn1.running_mean", "bn1.running_var", "bn2.running_mean", "bn2.running_var"):
        assert r0["final"][name].shape == (2, r0["final"][name].shape[1])  # [K, C]: one row per ticket
        assert torch.equal(r0["final"][name], r1["final"][name])
        assert torch.allclose(r0["final"][name], ref_run["final"][name], rtol=1e-6, atol=1e-9)
        assert not torch.allclose(r0["final"][name][0], r0["final"][name][1])  # tickets keep their own rows


def test_masked_update_guarantee_holds_distributed(dist_run):
    _, ranks = dist_run
    for r in ranks:
        assert r["checked"] > 1000  # entries outside the stepping ticket, over every retraining step
        assert r["violations"] == 0


def test_sharded_loader_gives_disjoint_slices_of_the_same_global_batches(dist_run):
    _, (r0, r1) = dist_run
    dl = DataLoader(TensorDataset(torch.arange(10)), batch_size=4, shuffle=True,
                    generator=torch.Generator().manual_seed(5))
    one = [[b[0].tolist() for b in dl] for _ in range(2)]  # one process, two epochs
    assert r0["shards"]["len"] == r1["shards"]["len"] == len(dl) == 3
    assert r0["shards"]["type"] == "_ShardedDataLoader"
    for e in range(2):
        for a, b, g in zip(r0["shards"]["epochs"][e], r1["shards"]["epochs"][e], one[e]):
            assert a + b == g and not set(a) & set(b)
            assert len(a) - len(b) in (0, 1)
    from rtl_plugin.comparison.baselines import CyclicLoader
    cyc = CyclicLoader(DataLoader(TensorDataset(torch.arange(10)), batch_size=4, shuffle=True,
                                  generator=torch.Generator().manual_seed(6)), 4)
    for a, b, g in zip(r0["shards"]["sliced"], r1["shards"]["sliced"], [b[0].tolist() for b in cyc]):
        assert a + b == g


def test_rank0_checkpoints_resume_in_one_process(dist_run):
    out, (r0, _) = dist_run
    assert (out / "search" / "search.json").is_file() and (out / "retrain" / "retrain.json").is_file()

    def never(*a):
        raise AssertionError("a finished checkpoint must not train again")

    routed = W.build()
    subs = W.subsets()
    res = RTLPruner(routed, sparsities=[0.5, 0.75], prune_fraction=0.5, progress=False).find_tickets(
        subs, train_step=never, checkpoint_dir=out / "search",
        optimizer_factory=lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9))
    _assert_masks_equal({t: ts.masks for t, ts in res.tickets_at.items()}, r0["masks"])
    opt = torch.optim.Adam(routed.parameters(), lr=1e-2, weight_decay=1e-3)
    hist = joint_retrain(routed, subs, optimizer=opt, epochs=2, train_step=never, progress=False,
                         checkpoint_dir=out / "retrain")
    assert hist["loss"] == r0["retrain_loss"]
    for n, v in routed.model.state_dict().items():
        assert torch.equal(v, r0["final"][n]), n


def test_nan_in_one_ranks_shard_stops_every_rank(dist_run):
    _, (r0, r1) = dist_run
    # (synchronised batch norm spreads rank 1's NaN into rank 0's statistics too; what matters is that both
    # ranks raise the same error instead of one rank waiting forever in DDP's all-reduce)
    for r in (r0, r1):
        assert "non-finite model output while training ticket 0" in r["nan"] and "every rank stops" in r["nan"]


def test_ddp_and_fsdp_wrapped_models_are_rejected(dist_run):
    _, (r0, r1) = dist_run
    for r in (r0, r1):
        assert "DistributedDataParallel" in r["errors"]["ddp"] and "plain model" in r["errors"]["ddp"]
        fsdp = r["errors"]["fsdp"]
        if not fsdp.startswith("unavailable"):
            assert "FSDP" in fsdp and "not support" in fsdp
    with pytest.raises(DistributedError, match="DataParallel"):
        rtl.wrap(nn.DataParallel(TinyCNN()), 2, example_inputs=torch.zeros(1, 3, 8, 8))
    with pytest.raises(DistributedError, match="DataParallel"):  # nested inside a plain module too
        rtl.wrap(nn.Sequential(nn.DataParallel(TinyCNN())), 2, example_inputs=torch.zeros(1, 3, 8, 8))


def test_helpers_are_no_ops_in_one_process():
    dl = DataLoader(TensorDataset(torch.arange(6)), batch_size=2)
    assert not D.is_distributed() and D.rank() == 0 and D.world_size() == 1 and D.is_main_process()
    assert D.shard_loader(dl) is dl
    masks = {"a": torch.tensor([True, False])}
    assert D.broadcast_masks(masks) is masks
    assert D.all_mean(1.5) == 1.5 and D.all_mean([1.0, 2.0]) == [1.0, 2.0]
    assert D.any_rank(True) and not D.any_rank(False)
    assert D.on_main_process(lambda a, b=0: a + b, 2, b=3) == 5
    routed = W.build()
    views = D.ticket_views(routed, [0, 1])
    assert [type(v).__name__ for v in views.values()] == ["_TicketView", "_TicketView"]
    assert D.prepare(routed, {0: dl}) == {0: dl}
    assert not D.launched_by_torchrun() or "RANK" in os.environ
    assert D.init_from_env("cpu") is False  # no torchrun environment in the test process
    assert D.local_device("cuda") == "cuda"


@pytest.mark.parametrize("call, match", [
    (lambda: D.all_mean("x"), "number"),
    (lambda: D.all_mean(True), "number"),
    (lambda: D.broadcast_masks([torch.ones(2)]), "dict"),
    (lambda: D.on_main_process(3), "callable"),
    (lambda: D.init_from_env(3), "device"),
    (lambda: D.ShardedBatchSampler([[0, 1]], 2, 2), "rank"),
])
def test_bad_inputs_name_the_fix(call, match):
    with pytest.raises(DistributedError, match=match):
        call()


def test_bad_loader_and_model_inputs():
    with pytest.raises(TypeError, match="RoutedModel"):
        D.prepare(TinyCNN(), {})
    with pytest.raises(DataError, match="dict"):
        D.prepare(W.build(), [1])
    with pytest.raises(DataError, match="__iter__"):
        D.ShardedBatchSampler(3, 0, 2)
    with pytest.raises(TypeError, match="nn.Module"):
        D.check_not_sharded("model")
    routed = W.build()
    with pytest.raises(DistributedError, match="iterable"):
        D.ticket_views(routed, 3)
    with pytest.raises(rtl.TicketError, match="ticket index"):
        D.ticket_views(routed, [0, 2])


def test_cli_joins_the_torchrun_group_and_only_rank0_writes(dist_run):
    """``rtl prune`` under torchrun's environment (see ``_dist_worker.cli_check``)."""
    out, _ = dist_run
    o0, o1 = (out / "cli0.txt").read_text(), (out / "cli1.txt").read_text()
    assert "TABLE balanced_accuracy" in o0 and "rtl prune" in o0
    assert "TABLE" not in o1 and "rtl prune" not in o1  # rank 1 is silent
    assert "GROUP_LEFT False RC 0" in o0 and "GROUP_LEFT False RC 0" in o1  # the group is destroyed at the end
    res = json.loads((out / "cli_run" / "results.json").read_text())
    assert res["sum"] == 3.0 and res["device"] == "cpu"  # both ranks took part; rank 0 wrote the folder
    assert sorted(p.name for p in (out / "cli_run").iterdir()) == ["results.json"]
