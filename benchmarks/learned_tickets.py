"""Learned tickets + a jointly trained gate (issue #20, an extension) against IMP-RTL, single masks, K independent
models and dense fine-tuning, on the offline heterogeneous multi-domain image task (``rtl demo``'s digits / MNIST /
LFW domains plus Fashion-MNIST), K = 4 tickets (one per domain, label-free at test time).

Every method starts from the same "pretrained" backbone: a dense model trained first on the mixed training set
(``--pretrain-epochs``); no pretrained download exists offline except EfficientNet-Lite0 (``--backbone lite0``, too
slow for a CPU run of this benchmark: ~4 s per K=4 step at 32 x 32 on the shared 2-core machine). Then, per
sparsity and seed, with about the same number of optimizer steps (``--epochs`` passes over the training set):

* ``learned_gate``     learned tickets + joint gate, label-free (``learn_tickets(routing="gate")``), frozen backbone;
* ``learned_groups``   learned tickets trained on the domain ids + gate trained jointly by cross-entropy, frozen
                       backbone; the gate routes at test time;
* ``imp_rtl``          the paper's RTL: per-domain IMP (3 rounds, rewind to the pretrained weights) then joint
                       retraining of the shared weights; a Gate fitted afterwards on the domain ids routes;
* ``single_magnitude`` one global magnitude mask on the pretrained weights, then masked fine-tuning;
* ``single_learned``   one learned mask (K = 1 learned ticket), frozen backbone;
* ``multi_models``     K independent models: a copy of the backbone per domain, magnitude-pruned to the sparsity and
                       fine-tuned on its domain only; the fitted gate routes;
* ``dense``            the pretrained model fine-tuned densely (sparsity 0), once per seed.

Rows record test accuracy (all test images), the mean of the per-domain accuracies, the routing accuracy (matched
to the domains for the label-free gate), the accuracy with oracle (domain id) routing, the per-input prunable
weights (cost) and the stored prunable weights (union of the tickets / sum over the K models): compare rows at
equal per-input cost (same sparsity) or at equal storage (stored weights).

Usage::

    python benchmarks/learned_tickets.py --out benchmarks/results/learned_tickets/cnn16.json
    python benchmarks/learned_tickets.py --quick
    python benchmarks/learned_tickets.py --merge seed0.json seed1.json seed2.json merged.json   # per-seed runs

EfficientNet-Lite0 (``--backbone lite0``): the ImageNet weights; the tickets live on ``blocks[5:]`` + ``conv_head``
+ a new linear head (``--suffix-from``), while the earlier stages are frozen, shared by every method and unmasked,
so their output features are computed once per seed and cached (64 x 64 inputs by default). The starting model is
a linear probe on the frozen suffix (``--pretrain-epochs``); learned tickets train the head beside their scores;
``dense`` fine-tunes the suffix only.
"""
from __future__ import annotations

import argparse
import copy
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

import rtl_plugin as rtl  # noqa: E402
from rtl_plugin.persist.io import atomic_write_json  # noqa: E402
from rtl_plugin.pruning import TicketScores  # noqa: E402
from rtl_plugin.routing import Gate, matched_accuracy  # noqa: E402
from rtl_plugin.routing.routers import flops_share, model_flops  # noqa: E402
from rtl_plugin.tasks.classification.data import load_domains  # noqa: E402
from rtl_plugin.training import joint_retrain, learn_tickets  # noqa: E402

DOMAINS = ("digits", "mnist", "lfw", "fashion")
K = len(DOMAINS)
IMP_ROUNDS = 3
GATE_POOL = 8  # 8 x 8 pooled pixels: 64 features, routing accuracy 0.94 fitted on 16 x 16 domains (0.82 with 4)
METHODS = ("learned_gate", "learned_gate_cotrain", "learned_groups", "imp_rtl", "single_magnitude", "single_learned",
           "multi_models")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


class SmallCNN(nn.Module):
    """4 x (conv 3x3 - BN - ReLU), two of them strided, global pool, linear ``head``. ``init="kaiming"`` draws the
    convs Kaiming-normal (fan_in, ReLU), the paper's θ0; ``"torch"`` keeps PyTorch's default (RESULTS §1d, §11)."""

    def __init__(self, in_ch: int, num_classes: int, width: int = 32, init: str = "kaiming"):
        super().__init__()
        if init not in ("kaiming", "torch"):
            raise ValueError(f"init must be 'kaiming' or 'torch', got {init!r}")
        chans = [in_ch, width // 2, width, 2 * width, 2 * width]
        layers = []
        for i in range(4):
            layers += [nn.Conv2d(chans[i], chans[i + 1], 3, stride=2 if i in (1, 2) else 1, padding=1, bias=False),
                       nn.BatchNorm2d(chans[i + 1]), nn.ReLU()]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(chans[-1], num_classes)
        for m in self.features:
            if isinstance(m, nn.Conv2d) and init == "kaiming":
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


def build_model(backbone: str, num_classes: int, seed: int, init: str = "kaiming") -> tuple[nn.Module, int]:
    torch.manual_seed(seed)
    if backbone == "cnn":
        return SmallCNN(1, num_classes, init=init), 1
    import timm
    from rtl_plugin.integrations.timm import load_efficientnet_lite0_imagenet
    model = timm.create_model("tf_efficientnet_lite0", num_classes=num_classes)
    return load_efficientnet_lite0_imagenet(model), 3


class Lite0Suffix(nn.Module):
    """The last block stages of a timm EfficientNet-Lite0 + ``conv_head`` / ``bn2`` + global pool + a new linear
    ``head``: the part that holds the tickets. Its input is the frozen, shared prefix's feature map."""

    def __init__(self, model: nn.Module, start: int, num_classes: int):
        super().__init__()
        self.blocks = copy.deepcopy(model.blocks[start:])
        self.conv_head = copy.deepcopy(model.conv_head)
        self.bn2 = copy.deepcopy(model.bn2)  # BatchNormAct2d (ReLU6 inside)
        self.head = nn.Linear(model.num_features, num_classes)

    def forward(self, x):
        return self.head(self.bn2(self.conv_head(self.blocks(x))).mean((2, 3)))


def lite0_prefix(model: nn.Module, start: int) -> nn.Module:
    return nn.Sequential(model.conv_stem, model.bn1, *model.blocks[:start]).eval()


def _weights(modules) -> int:
    return sum(m.weight.numel() for mod in modules for m in mod.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))


@torch.no_grad()
def lite0_split(a, data: dict, seed: int) -> tuple[nn.Module, dict, dict]:
    """(suffix with ImageNet weights and a new head, data whose x are the cached prefix features, the split's
    weight / FLOPs shares). Valid because the prefix is frozen and unmasked in every method."""
    from rtl_plugin.integrations.timm import LITE0_MEAN, LITE0_STD
    from rtl_plugin.routing.routers import model_flops
    from rtl_plugin.tasks.classification.data import NORM_MEAN, NORM_STD
    full, _ = build_model("lite0", data["num_classes"], seed)
    full.eval()
    prefix = lite0_prefix(full, a.suffix_from)
    suffix = Lite0Suffix(full, a.suffix_from, data["num_classes"])

    def features(x):  # the domains' normalisation -> [0, 1] -> Lite0's
        x01 = x * NORM_STD + NORM_MEAN
        return torch.cat([prefix((x01[i:i + 256] - LITE0_MEAN[0]) / LITE0_STD[0]) for i in range(0, len(x), 256)])

    t0 = time.perf_counter()
    out = dict(data)
    for split in ("train", "test"):
        x, y, d = data[split]
        out[split] = (features(x), y, d)
    image = data["train"][0][:1]
    total_w = _weights([full.conv_stem, full.blocks, full.conv_head, full.classifier])
    suffix_w = _weights([suffix])
    total_f = model_flops(full, image)
    info = {"suffix_from_block_stage": a.suffix_from, "feature_shape": list(out["train"][0].shape[1:]),
            "suffix_weights": suffix_w, "model_weights": total_w, "suffix_weight_share": round(suffix_w / total_w, 4),
            "model_flops": total_f, "suffix_flops_share": round(model_flops(suffix, out["train"][0][:1]) / total_f, 4),
            "feature_cache_s": round(time.perf_counter() - t0, 1)}
    return suffix, out, info


def probe_head(model: nn.Module, data, epochs: int, lr: float, seed: int) -> None:
    """Linear probe: train only ``model.head`` on the frozen (eval-mode) suffix's pooled features."""
    x, y, _ = data
    model.eval()
    with torch.no_grad():
        pooled = torch.cat([model.bn2(model.conv_head(model.blocks(x[i:i + 256]))).mean((2, 3))
                            for i in range(0, len(x), 256)])
    opt = torch.optim.Adam(model.head.parameters(), lr=lr)
    for _ in range(epochs):
        for f, t in loader(pooled, y, batch_size=64, seed=seed):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model.head(f), t).backward()
            opt.step()


def wrap(model: nn.Module, num_tickets: int, x: torch.Tensor):
    return rtl.wrap(copy.deepcopy(model), num_tickets, example_inputs=x[:1], granularity="weight", adapter="generic",
                    output_layers=["head"] if hasattr(model, "head") and isinstance(model.head, nn.Linear) else None)


def loader(*tensors, batch_size: int, seed: int, shuffle: bool = True):
    return DataLoader(TensorDataset(*tensors), batch_size=batch_size, shuffle=shuffle,
                      generator=torch.Generator().manual_seed(seed))


def train_dense(model: nn.Module, data, epochs: int, lr: float) -> int:
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    steps = 0
    for _ in range(epochs):
        for x, y, *_ in data:
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()
            steps += 1
    return steps


@torch.no_grad()
def accuracy(fn, x, y, dom) -> dict:
    pred = torch.cat([fn(x[i:i + 512]).argmax(1) for i in range(0, len(x), 512)])
    hit = (pred == y).float()
    return {"acc": float(hit.mean()), "domain_acc": float(np.mean([float(hit[dom == d].mean()) for d in range(K)]))}


def routed_eval(routed, gate, data: dict, *, matched: bool) -> dict:
    """Gate-routed accuracy, oracle-routed accuracy (domain id -> its ticket; label-free tickets are matched to the
    domains first), routing accuracy, per-input and stored prunable weights."""
    xt, yt, dt = data["test"]
    routed.eval()
    routes = gate(xt)
    out = accuracy(lambda x: routed(x, route=gate(x)), xt, yt, dt)
    if matched:
        out["gate_acc"], match = matched_accuracy(routes, dt, K)
        ticket_of = torch.tensor([match.index(d) for d in range(K)])
    else:
        out["gate_acc"], ticket_of = float((routes == dt).float().mean()), torch.arange(K)
    with torch.no_grad():
        oracle = torch.cat([routed(xt[i:i + 512], route=ticket_of[dt[i:i + 512]]).argmax(1)
                            for i in range(0, len(xt), 512)])
    out["oracle_acc"] = float((oracle == yt).float().mean())
    out["active"] = float(routed.tickets.kept().double().mean())
    out["stored"] = int(routed.tickets.union_count())
    return out


# --------------------------------------------------------------------------- methods


def run_learned(pre, data, s, a, seed, *, label_free: bool, backbone: str = "frozen") -> dict:
    x, y, d = data["train"]
    routed, gate = wrap(pre, K, x), Gate(K, pool=a.gate_pool, seed=seed)
    res = learn_tickets(routed, loader(x, y, d, batch_size=a.batch, seed=seed), sparsity=s, epochs=a.epochs,
                        routing="gate" if label_free else "groups", gate=gate, binarize_every=a.binarize_every,
                        lr=a.score_lr, backbone=backbone, backbone_lr=a.lr, trainable=a.trainable, seed=seed)
    out = routed_eval(routed, gate, data, matched=label_free)
    out.update(steps=res.steps, gate_flops_share=gate.flops_per_sample(tuple(x.shape[1:])) / a.model_flops,
               binarisations=len(res.history), final_sparsity=[round(v, 6) for v in res.history[-1].sparsity])
    return out


def run_single_learned(pre, data, s, a, seed) -> dict:
    x, y, _ = data["train"]
    routed = wrap(pre, 1, x)
    res = learn_tickets(routed, loader(x, y, torch.zeros_like(y), batch_size=a.batch, seed=seed), sparsity=s,
                        epochs=a.epochs, binarize_every=a.binarize_every, lr=a.score_lr, trainable=a.trainable,
                        seed=seed)
    xt, yt, dt = data["test"]
    out = accuracy(lambda v: routed.eval()(v, route=0), xt, yt, dt)
    out.update(active=float(routed.tickets.kept()[0]), stored=int(routed.tickets.union_count()), steps=res.steps)
    return out


def magnitude_tickets(routed, s):
    scores = TicketScores(routed.space, [{n: w.detach().abs() for n, w in routed.prunable_weights().items()}]
                          * routed.num_tickets)
    return scores.binarize(s)


def run_single_magnitude(pre, data, s, a, seed) -> dict:
    x, y, _ = data["train"]
    routed = wrap(pre, 1, x)
    routed.set_tickets(magnitude_tickets(routed, s))
    dl = loader(x, y, batch_size=a.batch, seed=seed)
    joint_retrain(routed, {0: dl}, optimizer=torch.optim.Adam(routed.parameters(), lr=a.lr), epochs=a.epochs,
                  progress=False)
    xt, yt, dt = data["test"]
    out = accuracy(lambda v: routed.eval()(v, route=0), xt, yt, dt)
    out.update(active=float(routed.tickets.kept()[0]), stored=int(routed.tickets.union_count()),
               steps=a.epochs * len(dl))
    return out


def domain_loaders(data, a, seed) -> dict:
    x, y, d = data["train"]
    return {k: loader(x[d == k], y[d == k], batch_size=a.batch, seed=seed + 100 * k) for k in range(K)}


def run_imp_rtl(pre, data, s, a, seed, gate) -> dict:
    x, _, _ = data["train"]
    routed = wrap(pre, K, x)
    subsets = domain_loaders(data, a, seed)
    fraction = 1.0 - (1.0 - s) ** (1.0 / IMP_ROUNDS)
    pruner = rtl.RTLPruner(routed, sparsities=[s], prune_fraction=fraction, progress=False)
    search = pruner.find_tickets(subsets, optimizer=torch.optim.Adam(routed.parameters(), lr=a.lr))
    search_steps = sum(len(subsets[r.ticket]) for r in search.history)  # one pass over the subset per round
    # joint retraining: M batch indices x K tickets per epoch (M = the longest domain loader)
    # joint retraining with the fine-tuning budget of the other methods (the search is extra cost, in `steps`):
    # M batch indices x K tickets per epoch (M = the longest domain loader)
    m = max(len(v) for v in subsets.values())
    retrain_epochs = max(1, round(a.epochs * len(loader(x, batch_size=a.batch, seed=0)) / (m * K)))
    joint_retrain(routed, subsets, optimizer=torch.optim.Adam(routed.parameters(), lr=a.lr), epochs=retrain_epochs,
                  progress=False)
    out = routed_eval(routed, gate, data, matched=False)
    out.update(steps=search_steps + retrain_epochs * m * K)
    return out


def run_multi_models(pre, data, s, a, seed, gate) -> dict:
    subsets = domain_loaders(data, a, seed)
    x, _, _ = data["train"]
    models, steps, stored = [], 0, 0
    for k in range(K):
        routed = wrap(pre, 1, x)
        routed.set_tickets(magnitude_tickets(routed, s))
        joint_retrain(routed, {0: subsets[k]}, optimizer=torch.optim.Adam(routed.parameters(), lr=a.lr),
                      epochs=a.epochs, progress=False)
        steps += a.epochs * len(subsets[k])
        stored += int(routed.tickets.kept()[0])
        models.append(routed.eval())
    xt, yt, dt = data["test"]

    def forward(v):
        r = gate(v)
        out = torch.zeros(len(v), models[0](v[:1], route=0).shape[1])
        for k in range(K):
            if bool((r == k).any()):
                out[r == k] = models[k](v[r == k], route=0)
        return out

    res = accuracy(forward, xt, yt, dt)
    with torch.no_grad():
        hits = sum(int((models[k](xt[dt == k], route=0).argmax(1) == yt[dt == k]).sum()) for k in range(K))
    res["oracle_acc"] = hits / len(xt)
    res.update(gate_acc=float((gate(xt) == dt).float().mean()), active=float(stored / K), stored=stored, steps=steps)
    return res


# --------------------------------------------------------------------------- driver


def load_data(a, seed: int, channels: int) -> dict:
    train, test = load_domains(image_size=a.image_size, channels=channels, domains=DOMAINS, seed=seed,
                               max_per_domain=a.max_per_domain, label_mode="global")
    return {"train": (train.x, train.y, train.domain), "test": (test.x, test.y, test.domain),
            "num_classes": train.num_classes}


def run_seed(a, seed: int, rows: list[dict]) -> None:
    torch.manual_seed(seed)
    data = load_data(a, seed, 1 if a.backbone == "cnn" else 3)
    t0 = time.perf_counter()
    if a.backbone == "cnn":
        pre, _ = build_model("cnn", data["num_classes"], seed, a.init)
        x, y, d = data["train"]
        train_dense(pre, loader(x, y, batch_size=a.batch, seed=seed), a.pretrain_epochs, a.lr)
        a.model_flops = model_flops(pre, x[:1])
    else:  # ImageNet Lite0: frozen shared prefix (features cached), tickets on the suffix, linear-probed head
        pre, data, a.split = lite0_split(a, data, seed)
        a.model_flops = a.split["model_flops"]
        probe_head(pre, data["train"], a.pretrain_epochs, a.lr, seed)
        x, y, d = data["train"]
    pre.eval()
    log(f"seed {seed}: {len(x)} train / {len(data['test'][0])} test inputs {tuple(x.shape[1:])}, "
        f"start model ready in {time.perf_counter() - t0:.0f}s")

    def add(method, sparsity, fn):
        t = time.perf_counter()
        torch.manual_seed(seed)
        row = {"seed": seed, "method": method, "sparsity": sparsity, **fn()}
        row["wall_s"] = round(time.perf_counter() - t, 2)
        rows.append(row)
        a.on_row()
        log(f"  {method:17s} s={sparsity:.2f} acc={row['acc']:.4f} dom={row['domain_acc']:.4f} "
            f"oracle={row.get('oracle_acc', float('nan')):.4f} gate={row.get('gate_acc', float('nan')):.3f} "
            f"stored={row['stored']} ({row['wall_s']}s)")

    n_weights = wrap(pre, 1, x).space.num_weights
    dense = copy.deepcopy(pre)
    steps = train_dense(dense, loader(x, y, batch_size=a.batch, seed=seed), a.epochs, a.lr)
    start = accuracy(pre, *data["test"])
    add("start", 0.0, lambda: {**start, "active": n_weights, "stored": n_weights, "steps": 0})
    add("dense", 0.0, lambda: {**accuracy(dense.eval(), *data["test"]), "active": n_weights, "stored": n_weights,
                               "steps": steps})
    gate = Gate(K, pool=a.gate_pool, seed=seed).fit(x, d, epochs=100, seed=seed)
    methods = {
        "learned_gate": lambda s: run_learned(pre, data, s, a, seed, label_free=True),
        "learned_gate_cotrain": lambda s: run_learned(pre, data, s, a, seed, label_free=True, backbone="train"),
        "learned_groups": lambda s: run_learned(pre, data, s, a, seed, label_free=False),
        "imp_rtl": lambda s: run_imp_rtl(pre, data, s, a, seed, gate),
        "single_magnitude": lambda s: run_single_magnitude(pre, data, s, a, seed),
        "single_learned": lambda s: run_single_learned(pre, data, s, a, seed),
        "multi_models": lambda s: run_multi_models(pre, data, s, a, seed, gate),
    }
    for s in a.sparsities:
        for name in a.methods:
            add(name, s, lambda: methods[name](s))


def summarise(rows: list[dict]) -> list[dict]:
    keys = sorted({(r["method"], r["sparsity"]) for r in rows}, key=lambda k: (k[1], k[0]))
    out = []
    for method, s in keys:
        sel = [r for r in rows if r["method"] == method and r["sparsity"] == s]
        item = {"method": method, "sparsity": s, "seeds": len(sel)}
        for m in ("acc", "domain_acc", "oracle_acc", "gate_acc", "active", "stored", "steps", "wall_s"):
            vals = [r[m] for r in sel if m in r]
            if vals:
                item[m] = round(float(np.mean(vals)), 4)
                item[m + "_std"] = round(float(np.std(vals)), 4)
        out.append(item)
    return out


def machine_info(threads: int) -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        commit = None
    return {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpus": os.cpu_count(), "torch_threads": threads, "commit": commit,
            "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}


def lite0_gate_share(num_tickets: int = K) -> dict:
    """The gate's FLOPs share of EfficientNet-Lite0 (random weights: only the count matters) at 32 and 224 px."""
    import timm
    model = timm.create_model("tf_efficientnet_lite0", num_classes=10).eval()
    return {str(px): flops_share(Gate(num_tickets, pool=GATE_POOL), model, torch.zeros(1, 3, px, px)) for px in (32, 224)}


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backbone", choices=("cnn", "lite0"), default="cnn")
    ap.add_argument("--init", choices=("kaiming", "torch"), default="kaiming",
                    help="cnn backbone's conv init before its dense training: kaiming (the paper's θ0) or torch "
                         "(PyTorch's default; §11's table until 2026-12-03)")
    ap.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.75, 0.9, 0.95])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--image-size", type=int, default=None, help="default 16 (cnn) / 64 (lite0)")
    ap.add_argument("--suffix-from", type=int, default=5,
                    help="lite0: tickets on blocks[N:] + conv_head + head; blocks[:N] are frozen, shared, cached")
    ap.add_argument("--gate-pool", type=int, default=None, help="gate pooling; default 8 (cnn) / 2 (lite0 features)")
    ap.add_argument("--max-per-domain", type=int, default=600)
    ap.add_argument("--pretrain-epochs", type=int, default=6, help="cnn: dense training; lite0: linear probe")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--score-lr", type=float, default=1e-2)
    ap.add_argument("--binarize-every", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--methods", nargs="+", choices=METHODS, default=[m for m in METHODS if m != "learned_groups"])
    ap.add_argument("--quick", action="store_true", help="one seed, sparsity 0.9, 1 epoch, 200 images per domain")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    lite0 = a.backbone == "lite0"
    a.image_size = a.image_size or (64 if lite0 else 16)
    a.gate_pool = a.gate_pool or (2 if lite0 else GATE_POOL)
    a.trainable = ["head"] if lite0 else []  # the new classifier learns beside frozen-backbone scores
    if a.quick:
        a.seeds, a.sparsities, a.epochs, a.pretrain_epochs, a.max_per_domain = [0], [0.9], 1, 1, 200
    return a


def write(a, rows: list[dict], t0: float, c0: float, *, complete: bool) -> dict:
    """The result so far (``complete`` False while seeds remain: a long run keeps every finished row)."""
    result = {"command": " ".join([Path(sys.executable).name] + sys.argv), "settings": {k: v for k, v in vars(a).items() if k != "on_row"},
              "machine": machine_info(a.threads), "domains": list(DOMAINS), "num_tickets": K,
              "gate_flops_share_lite0": a.gate_share_lite0, "split": getattr(a, "split", None), "rows": rows,
              "summary": summarise(rows), "complete": complete,
              "wall_time_s": round(time.perf_counter() - t0, 1), "cpu_time_s": round(time.process_time() - c0, 1)}
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(Path(a.out), result)
    return result


def merge(paths: list[str], out: str) -> dict:
    """One result from runs side by side (e.g. ``--seeds N`` each): rows concatenated (a seed / method / sparsity
    present twice keeps the first file's row), summary recomputed; every part's command, machine, split and times
    are kept."""
    import json
    parts = [json.loads(Path(p).read_text()) for p in paths]
    rows, seen = [], set()
    for r in (r for part in parts for r in part["rows"]):  # a (seed, method, sparsity) run twice: the first wins
        key = (r["seed"], r["method"], r["sparsity"])
        if key not in seen:
            seen.add(key)
            rows.append(r)
    result = {"merged_from": [str(p) for p in paths], "parts": [{k: v for k, v in part.items() if k not in
                                                                  ("rows", "summary")} for part in parts],
              "domains": parts[0]["domains"], "num_tickets": parts[0]["num_tickets"],
              "gate_flops_share_lite0": parts[0]["gate_flops_share_lite0"], "split": parts[0]["split"],
              "rows": rows, "summary": summarise(rows), "complete": all(part.get("complete") for part in parts)}
    atomic_write_json(Path(out), result)
    log(f"wrote {out} ({len(rows)} rows from {len(parts)} runs)")
    return result


def main(argv=None) -> dict:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--merge":
        return merge(sys.argv[2:-1], sys.argv[-1])
    a = parse(argv)
    torch.set_num_threads(a.threads)
    t0, c0 = time.perf_counter(), time.process_time()
    a.gate_share_lite0 = lite0_gate_share()
    rows: list[dict] = []
    a.on_row = lambda: write(a, rows, t0, c0, complete=False)
    for seed in a.seeds:
        run_seed(a, seed, rows)
    result = write(a, rows, t0, c0, complete=True)
    log(f"wrote {a.out}")
    return result


if __name__ == "__main__":
    main()
