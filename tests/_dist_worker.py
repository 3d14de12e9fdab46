"""The distributed test scenario: run by each rank of a 2-process gloo group (``python _dist_worker.py RANK
WORLD PORT OUT``) and, without a process group, by the test process as the 1-process reference."""
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import rtl_plugin as rtl  # noqa: E402
from rtl_plugin.pruning.pruner import RTLPruner  # noqa: E402
from rtl_plugin.training.retrain import default_train_step, joint_retrain, ticket_param_masks  # noqa: E402
from _helpers import TinyCNN  # noqa: E402

EX = torch.zeros(1, 3, 8, 8, dtype=torch.float64)


def build():
    """The same float64 TinyCNN with K=2 weight tickets in every process."""
    torch.manual_seed(0)
    return rtl.wrap(TinyCNN().double(), 2, example_inputs=EX, adapter="generic", output_layers=["head"])


def make_loader(seed: int, n: int, batch_size: int = 4):
    g = torch.Generator().manual_seed(seed)
    ds = TensorDataset(torch.randn(n, 3, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 5, (n,), generator=g))
    return DataLoader(ds, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed + 100))


def subsets():
    # ticket 0: 11 samples -> global batches 4, 4, 3 (the last one splits 2/1 over two ranks: unequal shards)
    return {0: make_loader(1, 11), 1: make_loader(2, 8)}


class GuardedStep:
    """The default train step, plus a check of the masked-update guarantee: the entries ticket k does not own
    must be bit-identical after its step (checked at the next step, after MaskedUpdate's write-back)."""

    def __init__(self, routed):
        self.routed = routed
        self.base = default_train_step()
        self.pending = None
        self.checked = 0
        self.violations = 0
        self.enabled = False
        self.calls = 0

    def check(self):
        if self.pending is not None:
            for p, keep, before in self.pending:
                moved = (p.detach() != before) & ~keep
                self.violations += int(moved.sum())
                self.checked += int((~keep).sum())
        self.pending = None

    def __call__(self, view, batch, opt):
        self.calls += 1
        if self.enabled:
            self.check()
            self.pending = [(p, m.expand_as(p), p.detach().clone()) for p, m in ticket_param_masks(self.routed, view.k)]
        return self.base(view, batch, opt)


def crash_at_ticket1(event):
    """A callback that crashes the search after ticket 1's first round (after ticket 0's checkpoints)."""
    if event["ticket"] == 1 and event["round"] == 1:
        raise RuntimeError("simulated crash")


def scenario(out: Path) -> dict:
    """Ticket search (2 targets, checkpointed; crashed once and resumed) then joint retraining (1 epoch,
    then resumed to 2)."""
    routed = build()
    subs = subsets()
    step = GuardedStep(routed)
    t0 = time.perf_counter()
    factory = lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9)  # noqa: E731
    crashed = False
    try:
        RTLPruner(routed, sparsities=[0.5, 0.75], prune_fraction=0.5, progress=False,
                  callbacks=[crash_at_ticket1]).find_tickets(subs, train_step=step, checkpoint_dir=out / "search",
                                                             optimizer_factory=factory)
    except RuntimeError as e:
        crashed = "simulated crash" in str(e)
    steps_before = step.calls
    pruner = RTLPruner(routed, sparsities=[0.5, 0.75], prune_fraction=0.5, progress=False)
    res = pruner.find_tickets(subs, train_step=step, checkpoint_dir=out / "search", optimizer_factory=factory)
    resumed_steps = step.calls - steps_before
    t_search = time.perf_counter() - t0
    after_search = {k: v.clone() for k, v in routed.model.state_dict().items()}
    step.enabled = True
    opt = torch.optim.Adam(routed.parameters(), lr=1e-2, weight_decay=1e-3)
    t0 = time.perf_counter()
    h1 = joint_retrain(routed, subs, optimizer=opt, epochs=1, train_step=step, progress=False,
                       checkpoint_dir=out / "retrain")
    step.check()
    h2 = joint_retrain(routed, subs, optimizer=opt, epochs=2, train_step=step, progress=False,
                       checkpoint_dir=out / "retrain")  # resumes after epoch 1 from the checkpoint
    step.check()
    t_retrain = time.perf_counter() - t0
    return {"masks": {t: {n: m.clone() for n, m in ts.masks.items()} for t, ts in res.tickets_at.items()},
            "search_loss": [h.loss for h in res.history], "after_search": after_search,
            "final": {k: v.clone() for k, v in routed.model.state_dict().items()},
            "retrain_loss": h1["loss"] + h2["loss"][len(h1["loss"]):], "steps": h2["steps"],
            "checked": step.checked, "violations": step.violations, "crashed": crashed,
            "search_steps": (steps_before, resumed_steps),
            "time": {"search": t_search, "retrain": t_retrain}}


def channel_scenario(out: Path) -> dict:
    """Channel granularity: one search round per ticket (torch-pruning importance) and one retraining epoch."""
    torch.manual_seed(1)
    routed = rtl.wrap(TinyCNN().double(), 2, example_inputs=EX, granularity="channel", adapter="generic",
                      output_layers=["head"])
    subs = subsets()
    res = RTLPruner(routed, sparsities=[0.5], prune_fraction=0.5, progress=False).find_tickets(
        subs, optimizer_factory=lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9))
    joint_retrain(routed, subs, optimizer=torch.optim.SGD(routed.parameters(), lr=0.05, momentum=0.9),
                  epochs=1, progress=False)
    return {"masks": {t: {n: m.clone() for n, m in ts.masks.items()} for t, ts in res.tickets_at.items()},
            "final": {k: v.clone() for k, v in routed.model.state_dict().items()}}


def mixed_loader(seed: int = 3):
    """(x, y, route) batches of 5 (shards 3 + 2 over two ranks) from a RouteBalancedSampler(mixed=True)."""
    from rtl_plugin.training import RouteBalancedSampler, RoutedDataset
    g = torch.Generator().manual_seed(seed)
    routes = torch.tensor([0, 1] * 6 + [0] * 3)
    ds = RoutedDataset(TensorDataset(torch.randn(15, 3, 8, 8, generator=g, dtype=torch.float64),
                                     torch.randint(0, 5, (15,), generator=g)), routes)
    return DataLoader(ds, batch_sampler=RouteBalancedSampler(routes, 5, seed=seed, mixed=True))


def mixed_scenario(out: Path) -> dict:
    """mixed_route_retrain: 1 epoch with a checkpoint, then resumed to 2 (scheduler and callbacks attached)."""
    from rtl_plugin.training import mixed_route_retrain
    torch.manual_seed(2)
    routed = build()
    routed.set_tickets(rtl.TicketSet.random(routed.space, 2, keep=0.6, seed=4))
    before = {k: v.clone() for k, v in routed.model.state_dict().items()}
    epochs_seen, sizes = [], []
    hists = []

    def step(view, batch, opt):  # records this rank's share of each global batch
        sizes.append(int(batch[0].shape[0]))
        return default_train_step()(view, batch, opt)

    for epochs in (1, 2):
        opt = torch.optim.SGD(routed.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        hists.append(mixed_route_retrain(routed, mixed_loader(), optimizer=opt, epochs=epochs, scheduler=sched,
                                         train_step=step,
                                         callbacks=lambda e: epochs_seen.append(e["epoch"]), progress=False,
                                         checkpoint_dir=out / "mixed"))
    return {"before": before, "final": {k: v.clone() for k, v in routed.model.state_dict().items()},
            "loss": hists[-1]["loss"], "steps": hists[-1]["steps"], "epochs_seen": epochs_seen, "sizes": sizes,
            "masks": {n: m.clone() for n, m in routed.tickets.masks.items()}}


def nan_shard_check() -> str:
    """Rank 1's shard holds a NaN sample: every rank must stop with the same error (no rank left waiting)."""
    from rtl_plugin.errors import RTLError
    routed = build()
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    x[3] = float("nan")  # global batch [0, 1, 2, 3]: rank 0 gets samples 0-1, rank 1 gets 2-3
    dl = DataLoader(TensorDataset(x, torch.zeros(4, dtype=torch.long)), batch_size=4)
    try:
        joint_retrain(routed, {0: dl, 1: dl}, optimizer=torch.optim.SGD(routed.parameters(), lr=0.1), epochs=1,
                      progress=False)
    except RTLError as e:
        return str(e)
    return "no error"


def shard_check() -> dict:
    """Indices each rank gets from a sharded shuffling DataLoader (2 epochs) and from a sliced wrapper."""
    from rtl_plugin.comparison.baselines import CyclicLoader
    from rtl_plugin.training.distributed import shard_loader
    dl = DataLoader(TensorDataset(torch.arange(10)), batch_size=4, shuffle=True,
                    generator=torch.Generator().manual_seed(5))
    sharded = shard_loader(dl)
    epochs = [[b[0].tolist() for b in sharded] for _ in range(2)]
    wrapped = shard_loader(CyclicLoader(DataLoader(TensorDataset(torch.arange(10)), batch_size=4, shuffle=True,
                                                   generator=torch.Generator().manual_seed(6)), 4))
    sliced = [b[0].tolist() for b in wrapped]
    return {"epochs": epochs, "sliced": sliced, "len": len(sharded), "type": type(sharded).__name__}


def wrapper_errors() -> dict:
    """Messages of rtl.wrap on DDP- and FSDP-wrapped models (needs a process group)."""
    from torch.nn.parallel import DistributedDataParallel
    from rtl_plugin.errors import DistributedError
    out = {}
    try:
        rtl.wrap(DistributedDataParallel(TinyCNN()), 2, example_inputs=torch.zeros(1, 3, 8, 8))
        out["ddp"] = "no error"
    except DistributedError as e:
        out["ddp"] = str(e)
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
        fsdp = FullyShardedDataParallel(TinyCNN(), device_id=torch.device("cpu"))
    except Exception as e:  # noqa: BLE001 - FSDP may not build on this CPU-only install
        out["fsdp"] = f"unavailable: {type(e).__name__}: {e}"
    else:
        try:
            rtl.wrap(fsdp, 2, example_inputs=torch.zeros(1, 3, 8, 8))
            out["fsdp"] = "no error"
        except DistributedError as e:
            out["fsdp"] = str(e)
    return out


def cli_check(rank: int, out: Path) -> None:
    """``rtl prune`` as torchrun starts it (RANK, WORLD_SIZE, MASTER_ADDR/PORT in the environment), with the
    pipeline replaced by one all-reduce: the CLI must join the group, print and write only on rank 0, and
    destroy the group. Rank's stdout goes to ``out/cli{rank}.txt``."""
    import contextlib
    import io
    import json
    import torch.distributed as dist
    import rtl_plugin.tasks.classification.runner as ex
    from rtl_plugin import cli

    def fake_run(cfg, run_out):
        t = torch.tensor([float(dist.get_rank() + 1)])
        dist.all_reduce(t)
        Path(run_out).mkdir(parents=True, exist_ok=True)
        (Path(run_out) / "results.json").write_text(json.dumps({"sum": t.item(), "device": cfg.device}))
        return {"rows": [], "similarity": [], "routers": {}, "figures": [], "total_time_s": 0.0,
                "wall_time_s": {"ticket_search": 0.0, "single_imp": 0.0, "joint_retrain": 0.0}}

    ex.run_classification, ex.format_table = fake_run, (lambda res, metric: "TABLE " + metric)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = cli.main(["prune", "--quick", "--no-progress", "--out", str(out / "cli_run")])
    (out / f"cli{rank}.txt").write_text(buf.getvalue() + f"\nGROUP_LEFT {dist.is_initialized()} RC {rc}\n")


def main(rank: int, world: int, port: int, out: Path) -> None:
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        res = scenario(out)
        res["channel"] = channel_scenario(out)
        res["mixed"] = mixed_scenario(out)
        res["shards"] = shard_check()
        res["nan"] = nan_shard_check()
        res["errors"] = wrapper_errors()
        torch.save(res, out / f"rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()
    if os.environ.get("MASTER_PORT"):  # the launcher set torchrun's variables: check the CLI too
        cli_check(rank, out)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]))
