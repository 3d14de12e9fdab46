"""The comparison protocol (rtl_plugin.comparison.protocol) on a tiny fake task: every method and sparsity gets a
row, the results follow the stable schema, equal-storage rows match RTL's union, missing hooks raise."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import rtl_plugin as rtl
from rtl_plugin.comparison.baselines import CyclicLoader
from rtl_plugin.comparison.protocol import ComparisonConfig, ComparisonTask, Evaluation, SingleImpSetup, compare
from rtl_plugin.errors import DataError, RTLError, TaskHookError

K, C, D = 2, 3, 8


def _accuracy(logits, y) -> dict:
    return {"accuracy": float((logits.argmax(1) == y).float().mean())}


class TinyTask(ComparisonTask):
    """Two subsets of random 8-dim points, a 2-layer MLP, cross-entropy, accuracy."""
    name = "tiny"

    def __init__(self, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(48, D, generator=g)
        self.y = torch.randint(0, C, (48,), generator=g)
        self.ctx = torch.arange(48) % K
        self.seed = seed
        self.loaders = {k: DataLoader(TensorDataset(self.x[self.ctx == k], self.y[self.ctx == k]), batch_size=8,
                                      shuffle=True, generator=torch.Generator().manual_seed(k)) for k in range(K)}
        self.all = DataLoader(TensorDataset(self.x, self.y), batch_size=8, shuffle=True,
                              generator=torch.Generator().manual_seed(99))
        self.searched = []

    def ticket_loaders(self):
        return self.loaders

    def build_routed(self, num_tickets):
        torch.manual_seed(self.seed)
        model = nn.Sequential(nn.Linear(D, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, C))
        return rtl.wrap(model, num_tickets, example_inputs=torch.randn(1, D), output_layers=["4"])

    @torch.no_grad()
    def evaluate_rtl(self, routed, tickets, sparsity):
        return [Evaluation("context", _accuracy(routed(self.x, route=self.ctx), self.y), {"note": "oracle"})]

    def train_dense(self):
        torch.manual_seed(self.seed)
        model = nn.Linear(D, C)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        for x, y in self.all:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        with torch.no_grad():
            return Evaluation("none", _accuracy(model(self.x), self.y))

    def single_imp_setup(self, method):
        return SingleImpSetup(self.build_routed(1), CyclicLoader(self.all, 6), 6, 6)

    def after_single_search(self, method, result):
        self.searched.append(method)

    @torch.no_grad()
    def evaluate_single(self, routed, method, tickets, sparsity):
        return Evaluation("none", _accuracy(routed(self.x, route=0), self.y))

    @torch.no_grad()
    def multi_imp_output(self, model, k):
        return model(self.x, route=0)

    def evaluate_multi(self, outputs, sparsity):
        logits = torch.stack(outputs)[self.ctx, torch.arange(len(self.y))]
        return Evaluation("context", _accuracy(logits, self.y))

    def describe(self, results):
        return {"task": self.name, "dataset": "random", "model": "mlp", "granularity": "weight", "seed": self.seed,
                "config": {"rows_seen": len(results["rows"])}}

    def plot(self, results, out_dir):
        (out_dir / "fake.txt").write_text("figure")
        return ["fake.txt"]


def _config(**kw):
    base = dict(sparsities=(0.5, 0.75), methods=("rtl", "dense", "single_imp", "multi_imp"), retrain_epochs=1,
                lr=1e-2, equal_storage=True)
    base.update(kw)
    return ComparisonConfig(**base)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    return compare(TinyTask(), _config(), out), out


def test_compare_writes_a_row_for_every_method_and_sparsity(tiny_run):
    res, _ = tiny_run
    cost = {(r["method"], r["sparsity"]) for r in res["rows"] if r["matching"] == "equal_cost"}
    assert cost == {("dense", 0.0)} | {(m, s) for m in ("rtl", "single_imp", "multi_imp") for s in (0.5, 0.75)}
    rtl_rows = [r for r in res["rows"] if r["method"] == "rtl"]
    assert all(r["note"] == "oracle" and len(r["per_ticket_params"]) == K for r in rtl_rows)
    assert [r["method"] for r in res["rows"]][:3] == ["rtl", "rtl", "dense"]  # methods run in config order


def test_compare_results_follow_the_stable_schema(tiny_run):
    res, out = tiny_run
    on_disk = json.loads((out / "results.json").read_text())
    for key in ("task", "dataset", "model", "granularity", "num_tickets", "seed", "device", "rows", "similarity",
                "wall_time_s", "config", "prunable_weights"):
        assert key in on_disk, key
    assert on_disk["num_tickets"] == K and on_disk["figures"] == ["fake.txt"]
    for r in on_disk["rows"]:
        assert set(r) >= {"method", "routing", "sparsity", "params", "matching", "metrics"}
        assert 0.0 <= r["metrics"]["accuracy"] <= 1.0
    assert [s["sparsity"] for s in on_disk["similarity"]] == [0.5, 0.75]
    for s in on_disk["similarity"]:
        assert 0.0 <= s["chance"] <= 1.0 and 0.0 <= s["mean_jaccard"] <= 1.0 and s["union"] >= s["intersection"]
    assert set(on_disk["wall_time_s"]) >= {"ticket_search", "single_imp", "multi_imp", "joint_retrain"}


def test_params_accounting(tiny_run):
    res, _ = tiny_run
    n = res["prunable_weights"]
    by = {(r["method"], r["sparsity"], r["matching"]): r for r in res["rows"]}
    assert by[("dense", 0.0, "equal_cost")]["params"] == n
    for s in (0.5, 0.75):
        sim = next(x for x in res["similarity"] if x["sparsity"] == s)
        assert by[("rtl", s, "equal_cost")]["params"] == sim["union"]
        assert by[("multi_imp", s, "equal_cost")]["params"] == sum(by[("rtl", s, "equal_cost")]["per_ticket_params"])
        assert abs(by[("single_imp", s, "equal_cost")]["params"] - round((1 - s) * n)) <= 1


def test_equal_storage_rows_store_as_many_weights_as_rtls_union(tiny_run):
    res, _ = tiny_run
    n = res["prunable_weights"]
    storage = [r for r in res["rows"] if r["matching"] == "equal_storage"]
    assert {r["sparsity"] for r in storage} == {0.5, 0.75}
    for r in storage:
        union = next(x["union"] for x in res["similarity"] if x["sparsity"] == r["sparsity"])
        assert r["method"] == "single_imp" and r["single_sparsity"] == round(1 - union / n, 6)
        assert abs(r["params"] - union) <= 1


def test_compare_is_deterministic_and_without_equal_storage_has_no_storage_rows(tiny_run):
    res, _ = tiny_run
    again = compare(TinyTask(), _config(equal_storage=False))
    assert not any(r["matching"] == "equal_storage" for r in again["rows"])
    # single IMP's extra equal-storage targets change its own run only: every other method is reproduced exactly
    first = {(r["method"], r["sparsity"]): r["metrics"] for r in res["rows"] if r["method"] != "single_imp"}
    second = {(r["method"], r["sparsity"]): r["metrics"] for r in again["rows"] if r["method"] != "single_imp"}
    assert first == second and len(first) == 5


def test_a_task_missing_a_hook_raises_a_named_error():
    class NoMulti(TinyTask):
        multi_imp_output = ComparisonTask.multi_imp_output

    with pytest.raises(TaskHookError, match=r"multi_imp_output") as err:
        compare(NoMulti(), _config())
    assert isinstance(err.value, RTLError)
    with pytest.raises(TaskHookError, match="ComparisonTask subclass"):
        compare(object(), _config())
    # leaving out the method that needs the hook is fine
    res = compare(NoMulti(), _config(methods=("rtl",), sparsities=(0.5,)))
    assert {r["method"] for r in res["rows"]} == {"rtl"}


def test_mixed_retraining_needs_its_loader_hook():
    with pytest.raises(TaskHookError, match="mixed_retrain_loader"):
        compare(TinyTask(), _config(methods=("rtl",), retrain_mode="mixed"))


@pytest.mark.parametrize("kw, match", [
    (dict(methods=("dense", "single_imp")), "must include 'rtl'"),
    (dict(methods=("rtl", "magic")), "unknown comparison methods"),
    (dict(methods=("rtl", "dense", "dense")), "twice"),
    (dict(retrain_mode="summed"), "retrain_mode"),
    (dict(sparsities=()), "sparsities is empty"),
])
def test_bad_comparison_config_raises(kw, match):
    with pytest.raises(DataError, match=match):
        compare(TinyTask(), _config(**kw))


def test_every_task_runner_takes_config_then_out_dir():
    import inspect

    from rtl_plugin.tasks.classification.runner import run_classification
    from rtl_plugin.tasks.inr import run_inr
    from rtl_plugin.tasks.segmentation import run_segmentation
    from rtl_plugin.tasks.speech.runner import run_speech
    for runner in (run_classification, run_inr, run_segmentation, run_speech):
        params = list(inspect.signature(runner).parameters)
        assert params[:2] == ["config", "out_dir"], (runner.__name__, params)


def test_multi_imp_per_sparsity_runs_right_after_rtl_at_each_sparsity():
    res = compare(TinyTask(), _config(methods=("rtl", "multi_imp"), multi_imp_per_sparsity=True))
    assert [(r["method"], r["sparsity"]) for r in res["rows"]] == [
        ("rtl", 0.5), ("multi_imp", 0.5), ("rtl", 0.75), ("multi_imp", 0.75)]


def test_further_test_sets_and_own_params_become_rows():
    class TwoTestSets(TinyTask):
        @torch.no_grad()
        def evaluate_rtl(self, routed, tickets, sparsity):
            main = _accuracy(routed(self.x, route=self.ctx), self.y)
            half = _accuracy(routed(self.x[:24], route=self.ctx[:24]), self.y[:24])
            return [Evaluation("context", main, {"test_set": "main"},
                               more={"half": Evaluation("context", half, {"test_set": "half"})})]

        def train_dense(self):
            return Evaluation("none", {"accuracy": 0.5}, params=1234)

    res = compare(TwoTestSets(), _config(methods=("rtl", "dense"), sparsities=(0.5,)))
    assert [r["test_set"] for r in res["rows"] if r["method"] == "rtl"] == ["main"]
    assert [(r["method"], r["test_set"]) for r in res["rows_half"]] == [("rtl", "half")]
    assert res["rows_half"][0]["per_ticket_params"] == res["rows"][0]["per_ticket_params"]
    assert next(r for r in res["rows"] if r["method"] == "dense")["params"] == 1234


class GateTask(TinyTask):
    """TinyTask plus the learned tickets' hooks."""

    @torch.no_grad()
    def evaluate_gate(self, routed, gate, sparsity):
        routes = gate(self.x)
        return Evaluation("gate", _accuracy(routed(self.x, route=routes), self.y),
                          {"routing_accuracy": float((routes == self.ctx).float().mean())})

    def classifier_names(self, routed):
        return ["4"]


@pytest.mark.parametrize("routing, routings", [("gate", {"gate"}), ("groups", {"context", "gate"})])
def test_learned_tickets_replace_the_imp_search(routing, routings):
    from rtl_plugin.comparison.learned import LearnedOptions
    task = GateTask()
    theta0 = {k: v.clone() for k, v in task.build_routed(K).model.state_dict().items()}
    cfg = _config(methods=("rtl", "multi_imp"), tickets="learned", learned=LearnedOptions(routing=routing, epochs=2))
    res = compare(task, cfg)
    rtl_rows = [r for r in res["rows"] if r["method"] == "rtl"]
    assert {(r["routing"], r["sparsity"]) for r in rtl_rows} == {(g, s) for g in routings for s in (0.5, 0.75)}
    n = res["prunable_weights"]
    for r in rtl_rows:  # every learned ticket exactly at its sparsity (weight granularity)
        assert r["per_ticket_params"] == [round((1 - r["sparsity"]) * n)] * K, r
    assert [s["sparsity"] for s in res["learned_tickets"]] == [0.5, 0.75]
    # 2 epochs x (3 batches per subset x K subsets)
    assert all(s["steps"] == 2 * 3 * K and len(s["route_counts"]) == K for s in res["learned_tickets"])
    assert {(r["method"], r["sparsity"]) for r in res["rows"] if r["method"] == "multi_imp"} == {
        ("multi_imp", 0.5), ("multi_imp", 0.75)}
    assert res["wall_time_s"]["joint_retrain"] == 0.0  # learned tickets are evaluated as learned
    frozen = task.build_routed(K).model.state_dict()  # build_routed's θ0 is untouched by the learned search
    assert all(torch.equal(frozen[k], v) for k, v in theta0.items())


def test_learned_tickets_need_the_gate_hook_and_valid_options():
    from rtl_plugin.comparison.learned import LearnedOptions
    with pytest.raises(TaskHookError, match="evaluate_gate"):
        compare(TinyTask(), _config(methods=("rtl",), tickets="learned"))
    with pytest.raises(DataError, match="tickets must be one of"):
        compare(GateTask(), _config(methods=("rtl",), tickets="lottery"))
    with pytest.raises(DataError, match="learned routing"):
        compare(GateTask(), _config(methods=("rtl",), tickets="learned", learned=LearnedOptions(routing="oracle")))
    with pytest.raises(DataError, match="learned epochs"):
        compare(GateTask(), _config(methods=("rtl",), tickets="learned", learned=LearnedOptions(epochs=0)))


def test_learned_run_folder_holds_the_gate(tmp_path):
    from rtl_plugin.comparison.learned import LearnedOptions, load_gate

    class Saving(GateTask):
        def ticket_metadata(self, sparsity):
            return {"sparsity": sparsity}

    task = Saving()
    res = compare(task, _config(methods=("rtl",), sparsities=(0.5,), tickets="learned",
                                learned=LearnedOptions(epochs=1)), tmp_path)
    folder = tmp_path / res["tickets"][0.5]
    gate = load_gate(folder)
    routed = rtl.load(folder, _plain_mlp(task))
    with torch.no_grad():
        routes = gate(task.x)
        acc = float((routed.eval()(task.x, route=routes).argmax(1) == task.y).float().mean())
    assert abs(acc - res["rows"][0]["metrics"]["accuracy"]) < 1e-6  # the saved gate + tickets give the row
    (folder / "gate.json").write_text("{not json")
    with pytest.raises(rtl.errors.CorruptFileError, match="rerun"):
        load_gate(folder)


def _plain_mlp(task):
    torch.manual_seed(task.seed)
    return nn.Sequential(nn.Linear(D, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, C))
