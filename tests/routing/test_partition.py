"""Partitions: class / groups / condition / k-means, embeddings, registry, errors."""
import json
import sys

import numpy as np
import pytest
import torch

import rtl_plugin as rtl
from rtl_plugin.errors import DataError, MissingDependencyError
from rtl_plugin.routing.partition import (Partition, by_class, by_condition, by_groups, by_kmeans, create_partitioner,
                                  embed, list_partitioners, register_partitioner)


# --------------------------------------------------------------------------- by_class


def test_by_class_assignment_subsets_sizes():
    y = torch.tensor([2, 0, 1, 2, 2, 0])
    p = by_class(y, class_names=["a", "b", "c"])
    assert p.kind == "class" and p.num_tickets == 3 and p.names == ["a", "b", "c"]
    assert torch.equal(p.assignment, y) and p.assignment.dtype == torch.int64
    assert p.sizes() == [2, 1, 3]
    subsets = p.subsets()
    assert [s.tolist() for s in subsets] == [[1, 5], [2], [0, 3, 4]]
    assert len(p) == 6 and p.composition is None
    assert by_class(np.array([0, 1, 1])).names == ["class 0", "class 1"]


def test_by_class_errors():
    with pytest.raises(DataError, match="no samples"):
        by_class(torch.tensor([0, 0, 2]))              # class 1 empty
    with pytest.raises(DataError, match="outside"):
        by_class(torch.tensor([0, 1, 3]), num_classes=3)
    with pytest.raises(DataError, match="negative"):
        by_class(torch.tensor([0, -1]))
    with pytest.raises(DataError, match="integer"):
        by_class(torch.tensor([0.0, 1.0]))
    with pytest.raises(DataError, match="1-D"):
        by_class(torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(DataError, match="empty"):
        by_class(torch.tensor([], dtype=torch.long))
    with pytest.raises(DataError, match="class_names"):
        by_class(torch.tensor([0, 1, 2]), class_names=["a", "b"])


# --------------------------------------------------------------------------- by_groups


def test_by_groups_composition_counts():
    y = torch.tensor([0, 1, 2, 3, 4, 4, 3, 0, 0])
    p = by_groups(y, [[0, 1], [2, 3, 4]])
    assert p.kind == "groups" and p.num_tickets == 2 and p.names == ["0+1", "2+3+4"]
    assert p.assignment.tolist() == [0, 0, 1, 1, 1, 1, 1, 0, 0]
    assert p.composition == {0: {0: 3, 1: 1}, 1: {2: 1, 3: 2, 4: 2}}
    assert p.sizes() == [4, 5]
    named = by_groups(y, [[0, 1], [2, 3, 4]], names=["small", "big"], class_names=list("abcde"))
    assert named.names == ["small", "big"]
    text = named.describe()
    assert len(text.splitlines()) == 2 and "'small' n=4" in text and "a x3" in text


def test_by_groups_errors():
    y = torch.tensor([0, 1, 2, 3])
    with pytest.raises(DataError, match="exactly one group"):
        by_groups(y, [[0, 1], [1, 2, 3]])
    with pytest.raises(DataError, match="is empty"):
        by_groups(y, [[0, 1, 2, 3], []])
    with pytest.raises(DataError, match="in no group"):
        by_groups(y, [[0, 1], [2]])                    # label 3 uncovered
    with pytest.raises(DataError, match="no samples"):
        by_groups(y, [[0, 1], [2, 3], [7]])            # group with no samples: K > non-empty subsets
    with pytest.raises(DataError, match="in no group"):
        by_groups(y, [[0, 1], [2, 3]], num_classes=5)
    with pytest.raises(DataError, match="outside"):
        by_groups(y, [[0, 1], [2, 3, 9]], num_classes=5)
    with pytest.raises(DataError, match="one name per ticket"):
        by_groups(y, [[0, 1], [2, 3]], names=["a"])
    with pytest.raises(DataError, match="non-empty sequence"):
        by_groups(y, [])
    with pytest.raises(DataError, match="class ids must be integers"):
        by_groups(y, [[0, 1], [2, "3"]])


# --------------------------------------------------------------------------- by_condition


def test_by_condition_strings_and_ints():
    p = by_condition(["rain", "clear", "rain", "fog", "clear"], y=[0, 1, 1, 0, 1])
    assert p.kind == "condition" and p.names == ["clear", "fog", "rain"]
    assert p.assignment.tolist() == [2, 0, 2, 1, 0]
    assert p.composition == {0: {1: 2}, 1: {0: 1}, 2: {0: 1, 1: 1}}
    q = by_condition(torch.tensor([5, 3, 5, 9]), names=["three", "five", "nine"])
    assert q.assignment.tolist() == [1, 0, 1, 2] and q.names == ["three", "five", "nine"]
    assert q.composition is None
    assert by_condition(np.array(["b", "a"])).assignment.tolist() == [1, 0]


def test_by_condition_errors():
    with pytest.raises(DataError, match="one name per ticket"):
        by_condition([0, 1, 1], names=["a"])
    with pytest.raises(DataError, match="integer or string"):
        by_condition(np.array([0.5, 1.0]))
    with pytest.raises(DataError, match="empty"):
        by_condition([])
    with pytest.raises(DataError, match="one of each per sample"):
        by_condition([0, 1, 1], y=[0, 1])
    with pytest.raises(DataError, match="single string"):
        by_condition("abc")
    with pytest.raises(DataError, match="mixes"):
        by_condition(np.array([1, "a"], dtype=object))


# --------------------------------------------------------------------------- by_kmeans


def _blobs(n_per=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    emb = torch.cat([c + torch.randn(n_per, 2, generator=g) for c in centers])
    y = torch.arange(3).repeat_interleave(n_per)
    perm = torch.randperm(3 * n_per, generator=g)
    return emb[perm], y[perm]


def test_by_kmeans_recovers_blobs_with_composition():
    emb, y = _blobs()
    p = by_kmeans(emb, 3, seed=0, y=y, class_names=["a", "b", "c"])
    assert p.kind == "kmeans" and p.num_tickets == 3 and p.names == ["cluster 0", "cluster 1", "cluster 2"]
    assert p.assignment[0] == 0                        # clusters numbered by first appearance
    # every cluster is pure: composition {ticket: {class: 40}}
    assert sorted(p.sizes()) == [40, 40, 40]
    for t, comp in p.composition.items():
        assert len(comp) == 1 and list(comp.values()) == [40]
        c = next(iter(comp))
        assert torch.equal(p.assignment == t, y == c)
    assert sum(n for comp in p.composition.values() for n in comp.values()) == len(y)
    again = by_kmeans(emb.numpy(), 3, seed=0)
    assert torch.equal(again.assignment, p.assignment) and again.composition is None


def test_by_kmeans_errors(monkeypatch):
    emb, y = _blobs(5)
    with pytest.raises(DataError, match="at least 20 samples"):
        by_kmeans(emb, 20)
    with pytest.raises(DataError, match="distinct"):
        by_kmeans(torch.zeros(6, 2), 2)
    with pytest.raises(DataError, match="one label per sample"):
        by_kmeans(emb, 2, y=y[:-1])
    with pytest.raises(DataError, match="NaN"):
        by_kmeans(torch.full((4, 2), float("nan")), 2)
    with pytest.raises(DataError, match="2-D"):
        by_kmeans(torch.zeros(4), 2)
    with pytest.raises(DataError, match="num_clusters must be"):
        by_kmeans(emb, 0)
    monkeypatch.setitem(sys.modules, "sklearn.cluster", None)
    with pytest.raises(MissingDependencyError, match="pip install"):
        by_kmeans(emb, 2)


# --------------------------------------------------------------------------- Partition object


def test_partition_validation_and_json_round_trip():
    with pytest.raises(DataError, match="no samples"):
        Partition(torch.tensor([0, 0, 2]), 3, ["a", "b", "c"], "class")
    with pytest.raises(DataError, match="outside"):
        Partition(torch.tensor([0, 3]), 2, ["a", "b"], "class")
    with pytest.raises(DataError, match="kind"):
        Partition(torch.tensor([0, 1]), 2, ["a", "b"], "nope")
    with pytest.raises(DataError, match="one name per ticket"):
        Partition(torch.tensor([0, 1]), 2, ["a"], "class")
    p = by_groups(torch.tensor([0, 1, 2, 2, 1]), [[0], [1, 2]], names=["x", "y"])
    d = json.loads(json.dumps(p.to_dict()))
    q = Partition.from_dict(d)
    assert torch.equal(q.assignment, p.assignment) and q.names == p.names and q.kind == p.kind
    assert q.composition == p.composition and q.sizes() == p.sizes()
    light = p.to_dict(include_assignment=False)
    assert "assignment" not in light and light["sizes"] == [1, 4]
    with pytest.raises(DataError, match="include_assignment=True"):
        Partition.from_dict(light)


# --------------------------------------------------------------------------- registry


def test_registry():
    assert list_partitioners() == ["class", "condition", "groups", "kmeans"]
    make = create_partitioner("groups", groups=[[0, 1], [2]])
    assert make(torch.tensor([0, 1, 2])).sizes() == [2, 1]
    emb, y = _blobs(10)
    assert create_partitioner("kmeans", k=3, seed=1)(emb, y=y).num_tickets == 3
    with pytest.raises(DataError, match="unknown partitioner"):
        create_partitioner("spectral")
    with pytest.raises(DataError, match="already registered"):
        register_partitioner("class")(lambda y: None)


# --------------------------------------------------------------------------- embed (+ k-means on real data)


@pytest.fixture(scope="module")
def domains():
    from rtl_plugin.tasks.classification.data import load_domains
    train, _ = load_domains(max_per_domain=60)
    return train


def test_embed_and_kmeans_on_domains(domains):
    import timm
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=22)
    model.train()
    x = domains.x
    feats = embed(model, x, batch_size=64)
    assert model.training                              # flag restored
    assert feats.shape == (len(domains), model.num_features) and feats.dtype == torch.float32
    assert torch.isfinite(feats).all()
    model.eval()
    with torch.no_grad():
        ref = model.forward_head(model.forward_features(x[:5]), pre_logits=True)
    torch.testing.assert_close(feats[:5], ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(embed(model, x[:20], batch_size=7), feats[:20], rtol=1e-4, atol=1e-5)
    p = by_kmeans(feats, 3, seed=0, y=domains.domain, class_names=domains.domain_names)
    assert p.num_tickets == 3 and sum(p.sizes()) == len(domains) and min(p.sizes()) >= 1
    for t in range(3):
        counts = torch.bincount(domains.domain[p.assignment == t], minlength=3)
        assert p.composition[t] == {c: int(n) for c, n in enumerate(counts.tolist()) if n}
    assert len(p.describe().splitlines()) == 3
    assert torch.equal(by_kmeans(feats, 3, seed=0).assignment, p.assignment)


def test_embed_plain_model_and_errors(make_tiny):
    model = make_tiny(num_classes=5)
    x = torch.randn(10, 3, 8, 8)
    out = embed(model, x, batch_size=3)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(out, model(x))
    routed = rtl.wrap(make_tiny(), 2, example_inputs=torch.randn(1, 3, 8, 8))
    with pytest.raises(DataError, match="dense model"):
        embed(routed, x)
    with pytest.raises(DataError, match="float tensor"):
        embed(model, x.long())
    with pytest.raises(DataError, match="batch_size"):
        embed(model, x, batch_size=0)


def test_by_kmeans_k_is_a_deprecated_alias_of_num_clusters():
    emb, y = _blobs(5)
    with pytest.warns(DeprecationWarning, match="num_clusters"):
        old = by_kmeans(emb, k=3, seed=0)
    new = by_kmeans(emb, num_clusters=3, seed=0)
    assert torch.equal(old.assignment, new.assignment) and new.num_tickets == 3
    with pytest.raises(DataError, match="not both"), pytest.warns(DeprecationWarning):
        by_kmeans(emb, 3, k=3)
    with pytest.raises(DataError, match="needs num_clusters"):
        by_kmeans(emb)
