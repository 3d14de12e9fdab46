"""Crash safety: checkpointed ticket search and joint retraining resume bit-identically after a crash."""
import json
import os
import pickle
import random
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

import rtl_plugin as rtl
from rtl_plugin.persist.checkpoint import CheckpointMismatchError
from rtl_plugin.errors import ArchitectureMismatchError, CorruptFileError
from rtl_plugin.pruning.pruner import RTLPruner
from rtl_plugin.training.retrain import default_train_step, joint_retrain

EX = torch.randn(1, 3, 8, 8)
TESTS_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the subprocess script imports TinyCNN from _helpers

# ----------------------------------------------------------------------------- 1. SIGKILL at random points

SCRIPT = textwrap.dedent('''
    import json, sys, time
    from pathlib import Path
    import torch
    torch.set_num_threads(1)
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset
    import rtl_plugin as rtl
    from rtl_plugin.pruning.pruner import RTLPruner
    from rtl_plugin.training.retrain import default_train_step, joint_retrain
    from safetensors.torch import save_file

    sys.path.insert(0, sys.argv[3])
    from _helpers import TinyCNN

    ck, out = Path(sys.argv[1]), Path(sys.argv[2])
    torch.manual_seed(0)
    routed = rtl.wrap(TinyCNN(), 2, example_inputs=torch.randn(1, 3, 8, 8), granularity="weight",
                      adapter="generic", output_layers=["head"])

    def loader(seed):
        g = torch.Generator().manual_seed(seed)
        ds = TensorDataset(torch.randn(24, 3, 8, 8, generator=g), torch.randint(0, 5, (24,), generator=g))
        return DataLoader(ds, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(seed + 1))

    subsets = {0: loader(1), 1: loader(2)}
    base = default_train_step()
    calls = [0]

    def step(view, batch, opt):  # global-RNG "augmentation" + a pause that makes the run killable mid-way
        calls[0] += 1
        time.sleep(0.01)
        x, y = batch
        return base(view, (x + 0.05 * torch.randn_like(x), y), opt)

    pruner = RTLPruner(routed, sparsities=[0.5, 0.8], prune_fraction=0.3, progress=False)
    res = pruner.find_tickets(subsets, train_step=step, checkpoint_dir=ck / "search",
                              optimizer_factory=lambda p: torch.optim.Adam(p, lr=1e-2))
    opt = torch.optim.Adam(routed.parameters(), lr=1e-2, weight_decay=1e-4)
    hist = joint_retrain(routed, subsets, optimizer=opt, epochs=6, train_step=step, progress=False,
                         checkpoint_dir=ck / "retrain")
    tensors = {f"w/{k}": v.contiguous() for k, v in routed.model.state_dict().items()}
    for t, ts in res.tickets_at.items():
        for n, m in ts.masks.items():
            tensors[f"m/{t}/{n}"] = m.to(torch.uint8).contiguous()
    tensors["rng"] = torch.get_rng_state()
    save_file(tensors, str(out / "final.safetensors"))
    (out / "history.json").write_text(json.dumps({"search": [[h.ticket, h.round, h.sparsity, h.loss]
                                                             for h in res.history], "retrain": hist}))
    (out / "steps.txt").write_text(str(calls[0]))  # train steps this process ran (fewer after a resume)
''')


def _popen(script, ck, out):
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    return subprocess.Popen([sys.executable, str(script), str(ck), str(out), TESTS_DIR], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _result(out):
    from safetensors.torch import load_file
    return load_file(str(out / "final.safetensors")), json.loads((out / "history.json").read_text())


def _reference_in_process(script, ck, out, monkeypatch):
    """The uninterrupted run, in this process (saves two seconds of imports; 1 torch thread like the others)."""
    import runpy
    out.mkdir(parents=True)
    threads = torch.get_num_threads()
    monkeypatch.setattr(sys, "argv", [str(script), str(ck), str(out), TESTS_DIR])
    try:
        runpy.run_path(str(script), run_name="__main__")
    finally:
        torch.set_num_threads(threads)


def _checkpointed_work(manifest, phase) -> bool:
    """A checkpoint of ``phase`` exists that holds completed work (the search also writes one at its start)."""
    if not manifest.exists():
        return False
    if phase != "search":
        return True
    try:
        return json.loads(manifest.read_text())["meta"]["position"]["rounds_done"] > 0
    except (ValueError, KeyError):
        return False


def test_sigkill_then_rerun_is_bit_identical(tmp_path, monkeypatch):
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    rng = random.Random()
    # two victims run side by side: one killed during the search, one during joint retraining, each a random
    # 0-0.3 s after a checkpoint of that phase was written; then both reruns finish the job
    victims = {phase: dict(ck=tmp_path / f"{phase}_ck", out=tmp_path / f"{phase}_out", delay=rng.uniform(0, 0.3))
               for phase in ("search", "retrain")}
    for phase, v in victims.items():
        v["proc"] = _popen(script, v["ck"], v["out"])
        v["manifest"] = v["ck"] / phase / f"{phase}.json"
        v["kill_at"] = None
    deadline = time.monotonic() + 60
    while any(v["proc"].returncode is None for v in victims.values()):
        now = time.monotonic()
        assert now < deadline, "victim processes did not reach their checkpoints in time"
        for phase, v in victims.items():
            p = v["proc"]
            if p.poll() is not None:
                continue
            if v["kill_at"] is None and _checkpointed_work(v["manifest"], phase):
                v["kill_at"] = now + v["delay"]
            if v["kill_at"] is not None and now >= v["kill_at"]:
                os.kill(p.pid, signal.SIGKILL)
                p.wait()
        time.sleep(0.005)
    for phase, v in victims.items():
        assert v["proc"].returncode == -signal.SIGKILL, (phase, v["proc"].stdout.read().decode()[-2000:])
        assert not (v["out"] / "final.safetensors").exists()
        v["proc"].stdout.close()
        v["proc"] = _popen(script, v["ck"], v["out"])  # rerun the same command: resumes
    _reference_in_process(script, tmp_path / "ref_ck", tmp_path / "ref_out", monkeypatch)
    for v in victims.values():
        outp, _ = v["proc"].communicate(timeout=60)
        assert v["proc"].returncode == 0, outp.decode()[-3000:]
    ref_t, ref_h = _result(tmp_path / "ref_out")
    assert any(k.startswith("m/") for k in ref_t) and any(k.startswith("w/") for k in ref_t)
    for phase, v in victims.items():
        got_t, got_h = _result(v["out"])
        assert got_t.keys() == ref_t.keys()
        for k in ref_t:
            assert torch.equal(got_t[k], ref_t[k]), (phase, k, v["delay"])
        assert got_h == ref_h, (phase, v["delay"])
        # the rerun resumed: it trained less than a full run
        assert int((v["out"] / "steps.txt").read_text()) < int((tmp_path / "ref_out" / "steps.txt").read_text())


# ----------------------------------------------------------------------------- 2. in-process exception

class Flaky:
    """The default step with global-RNG noise; raises once, at call ``fail_at``."""

    def __init__(self, fail_at=None):
        self.n, self.fail_at, self.base = 0, fail_at, default_train_step()

    def __call__(self, view, batch, opt):
        self.n += 1
        if self.n == self.fail_at:
            raise RuntimeError("simulated crash")
        x, y = batch
        return self.base(view, (x + 0.05 * torch.randn_like(x), y), opt)


def _setup(make_tiny, make_loader, order="ticket"):
    torch.manual_seed(123)
    routed = rtl.wrap(make_tiny(), 2, example_inputs=EX, granularity="weight", adapter="generic",
                      output_layers=["head"])
    subsets = {0: make_loader(3, seed=1, shuffle=True), 1: make_loader(3, seed=2, shuffle=True)}
    pruner = RTLPruner(routed, sparsities=[0.4, 0.7], prune_fraction=0.35, progress=False, order=order)
    return routed, subsets, pruner


def _run(routed, subsets, pruner, ck=None, search_fail=None, retrain_fail=None, every=1):
    kw = dict(optimizer_factory=lambda p: torch.optim.Adam(p, lr=1e-2), checkpoint_every=every)
    step = Flaky(search_fail)
    if search_fail is not None:
        with pytest.raises(RuntimeError, match="simulated"):
            pruner.find_tickets(subsets, train_step=step, checkpoint_dir=ck / "s", **kw)
    res = pruner.find_tickets(subsets, train_step=step, checkpoint_dir=None if ck is None else ck / "s", **kw)
    opt = torch.optim.SGD(routed.parameters(), lr=0.05, momentum=0.9)
    step = Flaky(retrain_fail)
    rkw = dict(optimizer=opt, epochs=4, train_step=step, progress=False,
               checkpoint_dir=None if ck is None else ck / "r")
    if retrain_fail is not None:
        with pytest.raises(RuntimeError, match="simulated"):
            joint_retrain(routed, subsets, **rkw)
    hist = joint_retrain(routed, subsets, **rkw)
    return res, hist, {k: v.clone() for k, v in routed.model.state_dict().items()}, torch.get_rng_state()


@pytest.mark.parametrize("every,order", [(1, "ticket"), (3, "ticket"), (1, "round"), (3, "round")])
def test_resume_after_exception_matches_uninterrupted(tmp_path, make_tiny, make_loader, every, order):
    ref = _run(*_setup(make_tiny, make_loader, order))  # no checkpoint at all
    # 3 batches per round: call 11 dies in round 4 of ticket 0 (ticket order) or in round 2 of ticket 1
    # (round order); 6 steps per epoch: call 16 dies in epoch 3
    got = _run(*_setup(make_tiny, make_loader, order), ck=tmp_path, search_fail=3 * 3 + 2, retrain_fail=6 * 2 + 4,
               every=every)
    assert [vars(h) for h in got[0].history] == [vars(h) for h in ref[0].history]
    assert got[0].sparsities() == ref[0].sparsities()
    for t in ref[0].tickets_at:
        for n, m in ref[0].tickets_at[t].masks.items():
            assert torch.equal(got[0].tickets_at[t].masks[n], m), (t, n)
    assert got[1] == ref[1]
    assert got[2].keys() == ref[2].keys()
    for k in ref[2]:
        assert torch.equal(got[2][k], ref[2][k]), k
    assert torch.equal(got[3], ref[3])
    # a finished checkpoint makes a rerun return at once (no training step is called)
    routed, subsets, pruner = _setup(make_tiny, make_loader, order)

    def never(*a):
        raise AssertionError("a finished search must not train again")
    again = pruner.find_tickets(subsets, train_step=never, checkpoint_dir=tmp_path / "s")
    assert [vars(h) for h in again.history] == [vars(h) for h in ref[0].history]


# ----------------------------------------------------------------------------- 3. wrong / damaged checkpoints

def _quick(make_tiny, make_loader, ck, targets=(0.5,), **kw):
    torch.manual_seed(0)
    routed = rtl.wrap(make_tiny(), 2, example_inputs=EX, granularity="weight", adapter="generic",
                      output_layers=["head"])
    subsets = {0: make_loader(1, seed=1, shuffle=True), 1: make_loader(1, seed=2, shuffle=True)}
    pruner = RTLPruner(routed, sparsities=list(targets), prune_fraction=0.5, progress=False, **kw)
    return pruner.find_tickets(subsets, train_step=lambda v, b, o: 0.0, checkpoint_dir=ck)


def test_other_configuration_raises(tmp_path, make_tiny, make_loader):
    _quick(make_tiny, make_loader, tmp_path)
    with pytest.raises(CheckpointMismatchError, match="targets"):
        _quick(make_tiny, make_loader, tmp_path, targets=(0.3, 0.5))
    with pytest.raises(ArchitectureMismatchError, match="schedule"):
        _quick(make_tiny, make_loader, tmp_path, schedule="count", prune_count=10)
    _quick(make_tiny, make_loader, tmp_path)  # the same configuration still resumes


def test_corrupted_checkpoint_raises(tmp_path, make_tiny, make_loader):
    _quick(make_tiny, make_loader, tmp_path)
    (st,) = tmp_path.glob("search.*.safetensors")
    data = bytearray(st.read_bytes())
    data[len(data) // 2] ^= 0xFF
    st.write_bytes(bytes(data))
    with pytest.raises(CorruptFileError, match="checksum"):
        _quick(make_tiny, make_loader, tmp_path)
    st.unlink()
    with pytest.raises(CorruptFileError, match="missing"):
        _quick(make_tiny, make_loader, tmp_path)
    mf = tmp_path / "search.json"
    mf.write_text(mf.read_text()[:100])
    with pytest.raises(CorruptFileError):
        _quick(make_tiny, make_loader, tmp_path)
    # a hand-edited manifest (meta changed without its checksum)
    _quick(make_tiny, make_loader, tmp_path / "b")
    mf = tmp_path / "b" / "search.json"
    m = json.loads(mf.read_text())
    m["meta"]["position"]["ticket"] = 0
    mf.write_text(json.dumps(m))
    with pytest.raises(CorruptFileError):
        _quick(make_tiny, make_loader, tmp_path / "b")


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_pickle_in_checkpoint_folder_is_never_loaded(tmp_path, make_tiny, make_loader, monkeypatch):
    _quick(make_tiny, make_loader, tmp_path)
    evil = pickle.dumps(_Evil())
    for name in ("evil.pkl", "search.pt", "search.0123456789abcdef.safetensors.pkl", "retrain.json.pkl"):
        (tmp_path / name).write_bytes(evil)

    def boom(*a, **k):
        raise AssertionError("pickle must never be used to read a checkpoint")
    monkeypatch.setattr(pickle, "load", boom)
    monkeypatch.setattr(pickle, "loads", boom)
    monkeypatch.setattr(torch, "load", boom)
    monkeypatch.chdir(tmp_path)
    _quick(make_tiny, make_loader, tmp_path)  # resumes, ignoring the foreign files
    # a manifest pointing at the pickle is rejected, the referenced tensor file replaced by a pickle too
    mf = tmp_path / "search.json"
    m = json.loads(mf.read_text())
    good = m["tensors"]["file"]
    m["tensors"]["file"] = "evil.pkl"
    mf.write_text(json.dumps(m))
    with pytest.raises(CorruptFileError, match="invalid tensor file"):
        _quick(make_tiny, make_loader, tmp_path)
    m["tensors"]["file"] = good
    mf.write_text(json.dumps(m))
    (tmp_path / good).write_bytes(evil)
    with pytest.raises(CorruptFileError):
        _quick(make_tiny, make_loader, tmp_path)
    assert not (tmp_path / "PWNED").exists()


def test_retrain_checkpoint_other_masks_raises(tmp_path, make_routed, make_loader):
    routed = make_routed("weight", num_tickets=2, seed=1)
    subsets = {0: make_loader(2, seed=1, shuffle=True), 1: make_loader(2, seed=2, shuffle=True)}
    opt = torch.optim.Adam(routed.parameters(), lr=1e-3)
    joint_retrain(routed, subsets, optimizer=opt, epochs=1, progress=False, checkpoint_dir=tmp_path)
    other = make_routed("weight", num_tickets=2, seed=2)  # other tickets
    with pytest.raises(CheckpointMismatchError, match="masks"):
        joint_retrain(other, subsets, optimizer=torch.optim.Adam(other.parameters()), epochs=2, progress=False,
                      checkpoint_dir=tmp_path)


def test_kill_between_tensor_and_manifest_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    from rtl_plugin.persist import checkpoint as C
    C.save_bundle(tmp_path, "x", {"a": torch.arange(3)}, {"epoch": 1}, config={"c": 1})

    def killed(*a, **k):
        raise KeyboardInterrupt  # the process dies after the new tensor file, before the new manifest
    monkeypatch.setattr(C, "write_manifest", killed)
    with pytest.raises(KeyboardInterrupt):
        C.save_bundle(tmp_path, "x", {"a": torch.arange(5)}, {"epoch": 2}, config={"c": 1})
    monkeypatch.undo()
    assert len(list(tmp_path.glob("x.*.safetensors"))) == 2
    tensors, meta = C.load_bundle(tmp_path, "x", config={"c": 1})
    assert meta == {"epoch": 1} and torch.equal(tensors["a"], torch.arange(3))
    C.save_bundle(tmp_path, "x", {"a": torch.arange(4)}, {"epoch": 2}, config={"c": 1})
    assert len(list(tmp_path.glob("x.*.safetensors"))) == 1  # stale files are cleaned up
    assert C.load_bundle(tmp_path, "x", config={"c": 1})[1] == {"epoch": 2}
    assert C.load_bundle(tmp_path / "none", "x", config={"c": 1}) is None


def test_optimizer_state_roundtrip_without_pickle():
    from rtl_plugin.persist.checkpoint import decode, encode
    p = torch.nn.Parameter(torch.randn(4))
    for opt in (torch.optim.Adam([p], lr=1e-3, betas=(0.8, 0.9)), torch.optim.SGD([p], lr=0.1, momentum=0.9),
                torch.optim.AdamW([p], amsgrad=True)):
        p.grad = torch.randn(4)
        opt.step()
        tensors = {}
        enc = json.loads(json.dumps(encode(opt.state_dict(), tensors, "o")))
        sd = decode(enc, tensors)
        ref = opt.state_dict()
        assert sd["param_groups"] == ref["param_groups"]
        assert sd["state"].keys() == ref["state"].keys()
        for i, st in ref["state"].items():
            for k, v in st.items():
                assert torch.equal(sd["state"][i][k], v) if torch.is_tensor(v) else sd["state"][i][k] == v
        opt.load_state_dict(sd)


@pytest.mark.parametrize("global_pruning", [False, True])
def test_resume_ratio_schedule_channel_mode(tmp_path, make_tiny, make_loader, global_pruning):
    """torch-pruning's schedule in channel mode: a resumed ticket's tp pruner is rebuilt on the dense model's
    channel counts and its masks replayed, so the resumed search equals the uninterrupted one."""
    def setup():
        torch.manual_seed(0)
        routed = rtl.wrap(make_tiny(width=8), 2, example_inputs=EX, granularity="channel", adapter="generic",
                          output_layers=["head"])
        subsets = {0: make_loader(3, seed=1, shuffle=True), 1: make_loader(3, seed=2, shuffle=True)}
        return routed, subsets, RTLPruner(routed, pruning_ratio=0.6, iterative_steps=3, progress=False,
                                          global_pruning=global_pruning)
    kw = dict(optimizer=None, checkpoint_every=1)
    routed, subsets, pruner = setup()
    ref = pruner.find_tickets(subsets, train_step=Flaky(None), **kw)
    routed, subsets, pruner = setup()
    with pytest.raises(RuntimeError, match="simulated"):
        pruner.find_tickets(subsets, train_step=Flaky(3 * 1 + 2), checkpoint_dir=tmp_path, **kw)  # round 2, ticket 0
    got = pruner.find_tickets(subsets, train_step=Flaky(None), checkpoint_dir=tmp_path, **kw)
    assert [vars(h) for h in got.history] == [vars(h) for h in ref.history]
    for t in ref.tickets_at:
        for n, m in ref.tickets_at[t].masks.items():
            assert torch.equal(got.tickets_at[t].masks[n], m), (t, n)
