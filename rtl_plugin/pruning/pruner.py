"""RTLPruner: per-subset iterative magnitude pruning with rewinding (stage 1 of Routing the Lottery).

For each ticket k independently: start from all-ones, then repeat until the last target sparsity:
rewind the weights to θ0 (or an early checkpoint θ_t), train the masked ticket on subset k, remove the
lowest-importance surviving weights (one global magnitude ranking over all prunable weights in weight
mode; any ``torch_pruning.importance`` criterion per channel group in channel mode). Masks are
recorded at every requested sparsity along this one trajectory.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn as nn

from rtl_plugin.errors import DataError, RTLError, SparsityError, TicketError
from rtl_plugin.tickets import TicketSet
from rtl_plugin.training.retrain import TrainStep, _progress, _to_device, default_train_step, normalize_subsets


def validate_sparsities(targets) -> list[float]:
    """Increasing sparsities in (0, 1)."""
    if isinstance(targets, (int, float)):
        targets = [targets]
    try:
        ts = [float(t) for t in targets]
    except (TypeError, ValueError) as e:
        raise SparsityError(f"target sparsities must be numbers in [0, 1), got {targets!r}.") from e
    if not ts:
        raise SparsityError("give at least one target sparsity, e.g. [0.5, 0.75, 0.9].")
    for t in ts:
        if not (0.0 <= t < 1.0) or math.isnan(t):
            raise SparsityError(f"sparsity {t} is outside [0, 1); 0.9 means 90% of prunable weights removed.")
    if any(b <= a for a, b in zip(ts, ts[1:])):
        raise SparsityError(f"target sparsities must be strictly increasing, got {ts}.")
    return ts


@dataclass
class RoundRecord:
    ticket: int
    round: int
    sparsity: float
    loss: float


@dataclass
class SearchResult:
    """Masks at each requested sparsity and the per-round trajectory."""
    tickets_at: dict[float, TicketSet]
    history: list[RoundRecord] = field(default_factory=list)
    wall_time_s: float = 0.0
    stopped: dict[int, int] = field(default_factory=dict)  # ticket -> round at which a callback stopped it

    def sparsities(self) -> list[float]:
        return sorted(self.tickets_at)


def magnitude_scores(routed) -> dict[str, torch.Tensor]:
    """|W| per prunable layer (the paper's criterion)."""
    return {n: w.detach().abs() for n, w in routed.prunable_weights().items()}


def kth_smallest(values: torch.Tensor, n: int, *, method: str = "auto") -> torch.Tensor:
    """The n-th smallest (1-based) entry of a 1-D tensor, as a 0-d tensor on its device.

    ``method``: "kthvalue" (selection on the CPU; what CPU tensors use), "sort" (a full sort on the tensor's
    device: CUDA's kthvalue is slow and the copy to the CPU costs more than the sort there) or "auto"
    (sort on CUDA, kthvalue otherwise). Both give the same value, ties included."""
    if not isinstance(values, torch.Tensor) or values.dim() != 1:
        raise RTLError(f"values must be a 1-D tensor, got {getattr(values, 'shape', type(values).__name__)}")
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= values.numel():
        raise RTLError(f"n must be an int in [1, {values.numel()}], got {n!r}")
    if method not in ("auto", "sort", "kthvalue"):
        raise RTLError(f"method must be 'auto', 'sort' or 'kthvalue', got {method!r}")
    if method == "sort" or (method == "auto" and values.is_cuda):
        return torch.sort(values).values[n - 1]
    return torch.kthvalue(values.cpu(), n).values.to(values.device)


class RTLPruner:
    """Adaptive ticket search.

    Args:
        routed: the RoutedModel to search tickets for (its K defines the number of tickets).
        target_sparsity: increasing sparsities in [0, 1) at which masks are recorded.
        schedule: "fraction" (remove ``prune_fraction`` of the surviving weights per round) or "count"
            (remove ``prune_count`` weights per round, the paper's appendix: 4,096). Rounds never
            overshoot a requested target: the last round before a target prunes exactly down to it.
        rewind: "init" (θ0, the weights at search start) or an int t: train dense for t steps first
            and rewind to θ_t.
        importance: channel mode only: a ``torch_pruning.importance`` callable (default group L1 magnitude).
        callbacks: ``cb(event: dict) -> "stop" | None`` after every round; "stop" ends that ticket's search
            (a collapse monitor plugs in here). Events: ticket, round, sparsity, masks (ticket k's, a copy).
        scope: weight mode: "global" (one magnitude ranking over all layers, the paper) or "layer" (every
            layer loses the same fraction per round; avoids emptying layers whose weights start small).
        order: "ticket" (each ticket's whole IMP run in turn, the paper) or "round" (all tickets advance one
            round at a time; with per-loader generators both give the same masks). Round order calls
            ``cb.on_round_end(event)`` on callbacks that have it, after every round of all tickets; it may
            return "stop" (restore every ticket's masks of the previous round and end the search: the
            remaining targets get those last healthy masks) or "relax" (restore them, halve the prune
            fraction and go on; after ``max_relaxations`` a "relax" acts as "stop"). Callbacks with an
            ``on_trained(event)`` method are also called after each ticket's training, before pruning
            (event: ticket, round, sparsity of the trained masks, target, model).
    """

    def __init__(self, routed, *, target_sparsity: Sequence[float] = (0.5, 0.75, 0.9), schedule: str = "fraction",
                 prune_fraction: float = 0.2, prune_count: int | None = None, rewind: str | int = "init",
                 importance=None, callbacks: Sequence[Callable[[dict], object]] = (), progress: bool = True,
                 scope: str = "global", order: str = "ticket", max_relaxations: int = 2):
        from rtl_plugin.routed import RoutedModel
        if not isinstance(routed, RoutedModel):
            raise TypeError(f"RTLPruner needs a RoutedModel (rtl.wrap(model, K)), got {type(routed).__name__}.")
        self.routed = routed
        self.targets = validate_sparsities(target_sparsity)
        if schedule not in ("fraction", "count"):
            raise SparsityError(f"schedule must be 'fraction' or 'count', got {schedule!r}.")
        if schedule == "fraction" and not (0.0 < float(prune_fraction) < 1.0):
            raise SparsityError(f"prune_fraction must be in (0, 1), got {prune_fraction}.")
        if schedule == "count":
            if not isinstance(prune_count, int) or isinstance(prune_count, bool) or prune_count < 1:
                raise SparsityError(f"schedule='count' needs prune_count, a positive int (the paper used 4096), got {prune_count!r}.")
            if routed.granularity == "channel":
                raise SparsityError("schedule='count' is for weight granularity; use schedule='fraction' with channels.")
        if not (rewind == "init" or (isinstance(rewind, int) and not isinstance(rewind, bool) and rewind >= 0)):
            raise SparsityError(f"rewind must be 'init' or a number of dense steps >= 0, got {rewind!r}.")
        self.schedule = schedule
        self.prune_fraction = float(prune_fraction)
        if scope not in ("global", "layer"):
            raise SparsityError(f"scope must be 'global' (one magnitude ranking, the paper) or 'layer' (every layer "
                                f"loses the same fraction), got {scope!r}.")
        self.scope = scope
        if order not in ("ticket", "round"):
            raise SparsityError(f"order must be 'ticket' (each ticket's whole search in turn, the paper) or 'round' "
                                f"(all tickets advance one pruning round at a time; needed by round-end callbacks "
                                f"such as CollapseMonitor), got {order!r}.")
        self.order = order
        if not isinstance(max_relaxations, int) or isinstance(max_relaxations, bool) or max_relaxations < 0:
            raise SparsityError(f"max_relaxations must be an int >= 0, got {max_relaxations!r}.")
        self.max_relaxations = max_relaxations
        self._relaxations = 0
        self.prune_count = prune_count
        self.rewind = rewind
        self.importance = importance
        self.callbacks = list(callbacks)
        self.progress = progress
        self.result: SearchResult | None = None
        self._probe = None

    # ------------------------------------------------------------------ public
    def find_tickets(self, subsets, *, train_step: TrainStep | None = None, loss_fn: Callable | None = None,
                     epochs_per_round: int = 1, optimizer_factory: Callable | None = None, device=None,
                     tickets: Sequence[int] | None = None, checkpoint_dir=None,
                     checkpoint_every: int = 1) -> SearchResult:
        """Run per-subset IMP for every ticket; sets the routed model's masks to the last target.

        Args:
            subsets: ``{ticket: DataLoader}`` (or a list), one per ticket.
            train_step: ``step(model, batch, optimizer) -> loss`` (torch-pruning style; default cross-entropy).
            epochs_per_round: passes over subset k between two pruning rounds (T in the paper).
            optimizer_factory: ``params -> optimizer``, a fresh one every round (default Adam lr 1e-3).
            tickets: search only these tickets (default: all keys of ``subsets``).
            checkpoint_dir: opt-in crash safety: after every ``checkpoint_every`` pruning rounds (and at the
                end) the search state is written atomically to this folder (see :mod:`rtl_plugin.persist.checkpoint`);
                if it already holds a checkpoint of the same configuration (model, tickets, targets, schedule,
                rewind, epochs_per_round, loader sizes) the search resumes from it instead of starting over.
                The rewind weights, masks, history and the RNG states (torch/numpy/python global, every
                loader's ``generator``) are restored, so a resumed search is bit-identical to an
                uninterrupted one on a deterministic device. Not restored: callbacks' own state (they are not
                replayed for completed rounds) and RNGs a loader holds outside ``loader.generator`` /
                ``loader.sampler.generator`` (e.g. a custom sampler's; a shuffling loader without a generator
                draws from the global torch RNG, which is restored).
        Returns:
            SearchResult with ``tickets_at[sparsity]`` (TicketSet) and the per-round history.
        """
        import time
        t0 = time.perf_counter()
        routed = self.routed
        loaders = normalize_subsets(subsets)
        from rtl_plugin.training.distributed import prepare
        loaders = prepare(routed, loaders)  # torchrun: rank 0's weights/masks/RNG everywhere, this rank's data shards
        K = routed.num_tickets
        which = sorted(loaders) if tickets is None else list(tickets)
        for k in which:
            if not 0 <= k < K:
                raise TicketError(f"ticket {k} is outside [0, {K}); the model routes {K} tickets.")
            if k not in loaders:
                raise DataError(f"no subset given for ticket {k}; pass one DataLoader per ticket.")
        if not isinstance(epochs_per_round, int) or epochs_per_round < 1:
            raise DataError(f"epochs_per_round must be a positive int, got {epochs_per_round!r}.")
        for k in loaders:
            if not 0 <= k < K:
                raise TicketError(f"subset {k} names a ticket outside [0, {K}); the model routes {K} tickets.")
        if tickets is None and sorted(loaders) != list(range(K)):
            missing = sorted(set(range(K)) - set(loaders))
            extra = sorted(set(loaders) - set(range(K)))
            raise DataError(f"the model routes K={K} tickets but subsets were given for {sorted(loaders)} "
                            f"(missing {missing}, unknown {extra}): K must equal the number of non-empty subsets; "
                            "re-wrap with the right K or pass tickets=[...] to search only some tickets.")
        if not isinstance(checkpoint_every, int) or isinstance(checkpoint_every, bool) or checkpoint_every < 1:
            raise DataError(f"checkpoint_every must be a positive int, got {checkpoint_every!r}.")
        step = train_step or default_train_step(loss_fn)
        factory = optimizer_factory or (lambda params: torch.optim.Adam(params, lr=1e-3))
        ck = None if checkpoint_dir is None else (checkpoint_dir, self._checkpoint_config(loaders, which, epochs_per_round))
        resumed = self._load_checkpoint(ck, loaders) if ck else None
        if resumed is None:
            if self.rewind != "init" and self.rewind > 0:
                self._dense_warmup(loaders, step, factory, device, int(self.rewind))
            theta = {k: v.detach().clone() for k, v in routed.model.state_dict().items()}
            start = routed.tickets.copy()
            recorded: dict[float, dict[int, dict[str, torch.Tensor]]] = {t: {} for t in self.targets}
            history: list[RoundRecord] = []
            stopped: dict[int, int] = {}
            for k in which:  # every searched ticket starts dense
                self._set_ticket(k, {n: torch.ones_like(m[k]) for n, m in start.masks.items()})
            pos = {"states": {str(k): [0, 0, False] for k in which}, "rounds_done": 0, "sweep": 0, "relaxations": 0}
        else:
            theta, start, recorded, history, stopped, pos = resumed
        rounds_done = pos["rounds_done"]
        base_fraction = self.prune_fraction
        self._relaxations = int(pos.get("relaxations", 0))
        self.prune_fraction = base_fraction / 2 ** self._relaxations

        def checkpoint() -> None:
            self._save_checkpoint(ck, loaders, theta, start, recorded, history, stopped,
                                  {**pos, "rounds_done": rounds_done, "relaxations": self._relaxations})

        if ck and resumed is None:
            checkpoint()  # the start state (and the dense warm-up, not repeated after a crash)
        rounds_est = sum(self._estimate_rounds() for _ in which)
        bar = _progress(total=rounds_est, desc="ticket search", enabled=self.progress)
        bar.update(len(history))
        states = pos["states"]  # str(k) -> [target index, round, stopped]
        snapshot = routed.tickets.copy() if self.order == "round" else None  # masks at the last healthy round end
        ok = False

        def record(k: int, ti: int) -> None:
            recorded[self.targets[ti]][k] = {n: m[k].clone() for n, m in routed.tickets.masks.items()}

        def advance(k: int) -> bool:
            """Ticket k's next pruning round (recording every target it has reached); False when it is done."""
            nonlocal rounds_done
            st = states[str(k)]
            while st[0] < len(self.targets):
                target = self.targets[st[0]]
                cur = self._sparsity_of(k)
                if st[2] or cur >= target - 1e-9:  # a stopped ticket records its last masks for every remaining target
                    record(k, st[0])
                    st[0] += 1
                    continue
                routed.model.load_state_dict(theta)
                loss = self._train_ticket(k, loaders[k], step, factory, epochs_per_round, device)
                trained = {"ticket": k, "round": st[1] + 1, "sparsity": cur, "target": target, "model": routed}
                for cb in self.callbacks:
                    if hasattr(cb, "on_trained"):
                        cb.on_trained(trained)
                masks = self._prune_round(k, target)
                self._set_ticket(k, masks)
                st[1] += 1
                sp = self._sparsity_of(k)
                history.append(RoundRecord(ticket=k, round=st[1], sparsity=sp, loss=loss))
                bar.update(1)
                bar.set_postfix(ticket=k, sparsity=f"{sp:.3f}")
                event = {"ticket": k, "round": st[1], "sparsity": sp, "loss": loss, "target": target, "model": routed,
                         "masks": {n: m[k].clone() for n, m in routed.tickets.masks.items()}} if self.callbacks else {}
                if any(cb(event) == "stop" for cb in self.callbacks):
                    st[2] = True
                    stopped[k] = st[1]
                elif sp <= cur + 1e-12:
                    warnings.warn(f"ticket {k}: no weight left to prune at sparsity {sp:.4f} "
                                  f"(target {target}); recording the sparsest reachable masks.",
                                  RuntimeWarning, stacklevel=3)
                    st[2] = True
                rounds_done += 1
                return True
            return False

        try:
            if self.order == "ticket":
                for k in which:
                    while advance(k):
                        if ck and rounds_done % checkpoint_every == 0:
                            checkpoint()
            else:
                sweep = pos.get("sweep", 0)
                while True:
                    moved = [k for k in which if advance(k)]
                    if not moved:
                        break
                    sweep += 1
                    action = self._round_end(sweep, which, moved)
                    if action in ("stop", "relax"):
                        # back to the last healthy masks: every ticket that moved this round is rewound one round
                        for k in moved:
                            self._set_ticket(k, {n: m[k].clone() for n, m in snapshot.masks.items()})
                        relax = action == "relax" and self.schedule == "fraction" and self._relaxations < self.max_relaxations
                        if relax:
                            self._relaxations += 1
                            self.prune_fraction /= 2
                        else:
                            for k in which:
                                if not states[str(k)][2]:
                                    states[str(k)][2] = True
                                    stopped[k] = states[str(k)][1]
                    snapshot = routed.tickets.copy()
                    pos["sweep"] = sweep
                    if ck and rounds_done % checkpoint_every == 0:
                        checkpoint()
            if ck:  # the finished search: a rerun returns at once
                checkpoint()
            ok = True
        finally:
            bar.close()
            self.prune_fraction = base_fraction
            routed.model.load_state_dict(theta)
            if not ok:  # an interrupted search leaves the model as it found it
                routed.set_tickets(start)
        tickets_at = {}
        for t, per in recorded.items():
            ts = start.copy()
            new = {n: m.clone() for n, m in ts.masks.items()}
            for k, mk in per.items():
                for n in new:
                    new[n][k] = mk[n]
            tickets_at[t] = TicketSet(routed.space, new)
        routed.set_tickets(tickets_at[self.targets[-1]])
        self.result = SearchResult(tickets_at=tickets_at, history=history, wall_time_s=time.perf_counter() - t0,
                                   stopped=stopped)
        return self.result

    def _round_end(self, sweep: int, which, moved) -> str | None:
        """Round-end callbacks; the strongest action asked for ("stop" > "relax" > None)."""
        routed = self.routed
        event = {"round": sweep, "tickets": routed.tickets, "active": list(moved), "searched": list(which),
                 "sparsity": [float(s) for s in routed.tickets.sparsity()], "model": routed,
                 "relaxations": self._relaxations}
        actions = set()
        for cb in self.callbacks:
            if hasattr(cb, "on_round_end"):
                a = cb.on_round_end(event)
                if a not in (None, "stop", "relax"):
                    raise RTLError(f"on_round_end returned {a!r}; return None, 'stop' or 'relax'.")
                actions.add(a)
        return "stop" if "stop" in actions else "relax" if "relax" in actions else None

    # ------------------------------------------------------------------ checkpoints
    def _checkpoint_config(self, loaders, which, epochs_per_round) -> dict:
        from rtl_plugin.persist.checkpoint import loaders_config
        sp = self.routed.space
        return {"kind": "find_tickets", "fingerprint": sp.fingerprint, "granularity": sp.granularity,
                "num_tickets": self.routed.num_tickets,
                "mask_shapes": {k: list(v) for k, v in sp.mask_shapes().items()},
                "tickets": list(which), "targets": self.targets, "schedule": self.schedule,
                "prune_fraction": self.prune_fraction, "prune_count": self.prune_count, "rewind": self.rewind,
                "scope": self.scope, "order": self.order, "max_relaxations": self.max_relaxations,
                "epochs_per_round": epochs_per_round, "loaders": loaders_config(loaders)}

    def _save_checkpoint(self, ck, loaders, theta, start, recorded, history, stopped, pos) -> None:
        """State at a round boundary. The current weights are not stored: every round starts by rewinding to
        θ, and the optimizer is fresh every round."""
        from rtl_plugin.persist.checkpoint import capture_rng, pack_masks, save_bundle
        tensors: dict[str, torch.Tensor] = {f"theta/{k}": v for k, v in theta.items()}
        pack_masks(start.masks, "start", tensors)
        pack_masks(self.routed.tickets.masks, "current", tensors)
        rec = []
        for ti, t in enumerate(self.targets):
            for k, masks in recorded[t].items():
                pack_masks(masks, f"recorded/{ti}/{k}", tensors)
                rec.append([ti, k])
        meta = {"position": pos, "recorded": rec, "stopped": sorted([k, r] for k, r in stopped.items()),
                "history": [[h.ticket, h.round, h.sparsity, h.loss] for h in history],
                "rng": capture_rng(loaders, tensors)}
        from rtl_plugin.training.distributed import on_main_process
        on_main_process(save_bundle, ck[0], "search", tensors, meta, config=ck[1])  # torchrun: rank 0 writes, all wait

    def _load_checkpoint(self, ck, loaders):
        """``(theta, start, recorded, history, stopped, position)`` from ``ck``'s folder (None: no checkpoint);
        sets the model's current masks and restores the RNG states."""
        from rtl_plugin.persist.checkpoint import load_bundle, restore_rng, unpack_masks
        from rtl_plugin.errors import CorruptFileError
        got = load_bundle(ck[0], "search", config=ck[1])
        if got is None:
            return None
        tensors, meta = got
        routed = self.routed
        K = routed.num_tickets
        shapes = routed.space.mask_shapes()
        try:
            theta = {k[len("theta/"):]: v for k, v in tensors.items() if k.startswith("theta/")}
            if set(theta) != set(routed.model.state_dict()):
                raise CorruptFileError(f"the checkpoint's rewind weights do not match this model's state dict keys; "
                                       f"delete {ck[0]} to start over.")
            dev = routed.tickets.device
            full = {n: (K, *s) for n, s in shapes.items()}
            start = TicketSet(routed.space, {n: m.to(dev) for n, m in unpack_masks(tensors, "start", full).items()})
            current = TicketSet(routed.space, unpack_masks(tensors, "current", full))
            recorded: dict[float, dict[int, dict[str, torch.Tensor]]] = {t: {} for t in self.targets}
            for ti, k in meta["recorded"]:
                recorded[self.targets[ti]][int(k)] = {n: m.to(dev) for n, m in
                                                      unpack_masks(tensors, f"recorded/{ti}/{k}", shapes).items()}
            history = [RoundRecord(ticket=int(a), round=int(b), sparsity=float(c), loss=float(d))
                       for a, b, c, d in meta["history"]]
            stopped = {int(k): int(r) for k, r in meta["stopped"]}
            p = meta["position"]
            pos = {"states": {str(k): [int(a), int(b), bool(c)] for k, (a, b, c) in p["states"].items()},
                   "rounds_done": int(p["rounds_done"]), "sweep": int(p["sweep"]), "relaxations": int(p["relaxations"])}
        except (KeyError, TypeError, ValueError, IndexError, TicketError) as e:
            raise CorruptFileError(f"the search checkpoint in {ck[0]} is damaged ({e!r}); delete it to start over.") from e
        with torch.no_grad():
            routed.model.load_state_dict(theta)
        theta = {k: v.detach().clone() for k, v in routed.model.state_dict().items()}  # on the model's device
        routed.set_tickets(current)
        restore_rng(loaders, tensors, meta["rng"])
        return theta, start, recorded, history, stopped, pos

    # ------------------------------------------------------------------ internals
    def _estimate_rounds(self) -> int:
        last = self.targets[-1]
        if self.schedule == "fraction":
            n = math.ceil(math.log(max(1 - last, 1e-9)) / math.log(1 - self.prune_fraction))
            return n + len(self.targets)
        return math.ceil(last * self.routed.space.num_weights / self.prune_count)

    def _sparsity_of(self, k: int) -> float:
        """Ticket k's sparsity without counting the other K - 1 tickets (weight mode: its masks directly)."""
        ts = self.routed.tickets
        if self.routed.granularity != "weight":
            return float(ts.sparsity()[k])
        kept = sum(int(m[k].sum()) for m in ts.masks.values())
        return 1.0 - kept / self.routed.space.num_weights

    def _set_ticket(self, k: int, masks: dict[str, torch.Tensor]) -> None:
        self.routed.set_ticket(k, masks)

    def _train_ticket(self, k, loader, step, factory, epochs, device) -> float:
        from rtl_plugin.training.distributed import all_mean, ticket_view
        routed = self.routed
        view = ticket_view(routed, k)  # torchrun: DDP over the RoutedModel, synced batch norms
        opt = factory([p for p in routed.parameters() if p.requires_grad])
        was = routed.training
        routed.train()
        total, n = 0.0, 0
        try:
            for _ in range(epochs):
                for batch in loader:
                    loss = step(view, _to_device(batch, device), opt)
                    total += float(loss or 0.0) * getattr(view, "loss_weight", 1.0)  # torchrun: this shard's share
                    n += 1
        finally:
            routed.train(was)
        if n == 0:
            raise DataError(f"subset {k} yielded no batch; every ticket needs data.")
        return all_mean(total / n)  # torchrun: the same loss on every rank (callbacks decide alike)

    def _dense_warmup(self, loaders, step, factory, device, steps: int) -> None:
        """Train all tickets' data on the (still dense) shared weights for ``steps`` batches (rewind point θ_t)."""
        from rtl_plugin.training.retrain import balanced_cyclic_batches
        routed = self.routed
        opt = factory([p for p in routed.parameters() if p.requires_grad])
        from rtl_plugin.training.distributed import ticket_views
        views = ticket_views(routed, loaders)
        done = 0
        saved = routed.tickets
        routed.set_tickets(TicketSet.full(routed.space, routed.num_tickets, device=saved.device))  # dense warm-up
        was = routed.training
        routed.train()
        try:
            while done < steps:
                for _, k, batch in balanced_cyclic_batches(loaders):
                    step(views[k], _to_device(batch, device), opt)
                    done += 1
                    if done >= steps:
                        break
        finally:
            routed.set_tickets(saved)
            routed.train(was)

    def _n_to_prune(self, kept: int, target: float) -> int:
        total = self.routed.space.num_weights
        floor_kept = math.floor((1 - target) * total + 1e-9)  # kept <= (1 - target) N  <=>  sparsity >= target
        n = math.ceil(self.prune_fraction * kept) if self.schedule == "fraction" else self.prune_count
        return max(0, min(n, kept - floor_kept))

    def _prune_round(self, k: int, target: float) -> dict[str, torch.Tensor]:
        from rtl_plugin.training.distributed import broadcast_masks
        if self.routed.granularity == "weight":
            return broadcast_masks(self._prune_weights(k, target))  # torchrun: rank 0's masks on every rank
        return broadcast_masks(self._prune_channels(k, target))

    def _prune_weights(self, k: int, target: float) -> dict[str, torch.Tensor]:
        routed = self.routed
        masks = {n: m[k].clone() for n, m in routed.tickets.masks.items()}
        scores = magnitude_scores(routed)
        for nm, sc in scores.items():
            if not bool(torch.isfinite(sc).all()):
                raise RTLError(f"ticket {k}: layer {nm!r} has NaN/inf weights after training; the search cannot "
                               "rank them. Lower the learning rate or check the data and the train step.")
        kept = int(sum(int(m.sum()) for m in masks.values()))
        n = self._n_to_prune(kept, target)
        if n <= 0:
            return masks
        names = list(masks)
        if self.scope == "layer":
            return self._prune_weights_layerwise(masks, scores, kept, n)
        # global threshold: the n-th smallest surviving magnitude (pruned weights score +inf); ties broken by
        # position for exact counts: the same set as the first n of a stable argsort of the survivors, in O(N)
        inf = torch.tensor(float("inf"))
        flat = torch.cat([torch.where(masks[nm], scores[nm].float(), inf.to(scores[nm].device)).flatten()
                          for nm in names])
        thr = kth_smallest(flat, n)
        drop = flat < thr
        need = n - int(drop.sum())
        if need > 0:
            drop[(flat == thr).nonzero().flatten()[:need]] = True
        off = 0
        for nm in names:
            m = masks[nm]
            m &= ~drop[off:off + m.numel()].view_as(m)
            off += m.numel()
        return masks

    @staticmethod
    def _prune_weights_layerwise(masks, scores, kept: int, n: int) -> dict[str, torch.Tensor]:
        """Every layer loses the same fraction n / kept of its surviving weights (largest remainders get the
        leftover counts, never the last weight of a layer): avoids the layer collapse a global ranking causes
        when deep layers start with smaller weights."""
        names = list(masks)
        alive = {nm: int(masks[nm].sum()) for nm in names}
        exact = {nm: n * alive[nm] / kept for nm in names}
        quota = {nm: min(int(math.floor(exact[nm])), max(alive[nm] - 1, 0)) for nm in names}
        left = n - sum(quota.values())
        for nm in sorted(names, key=lambda x: exact[x] - math.floor(exact[x]), reverse=True):
            if left <= 0:
                break
            if quota[nm] < alive[nm] - 1:
                quota[nm] += 1
                left -= 1
        for nm in names:
            q = quota[nm]
            if q <= 0:
                continue
            m = masks[nm]
            idx = m.nonzero(as_tuple=True)
            vals = scores[nm][idx].float()
            drop = torch.argsort(vals, stable=True)[:q]
            m[tuple(i[drop] for i in idx)] = False
        return masks

    # -- channel mode ---------------------------------------------------
    def _channel_importance(self, k: int) -> dict[str, torch.Tensor]:
        """Per-group importance [C_root] of ticket k's trained weights, estimated on the UNMASKED weights."""
        import torch_pruning as tp
        from rtl_plugin import _tp
        routed = self.routed
        if self._probe is None:
            plain = routed.plain_copy(0)
            root = plain.get_submodule(routed.space.trace_root) if routed.space.trace_root else plain
            p = next(root.parameters())
            ex = torch.zeros(routed.space.example_input_shape, device=p.device, dtype=p.dtype)
            dg = _tp.build_graph(root, ex)
            prefix = routed.space.trace_root + "." if routed.space.trace_root else ""
            mods = dict(root.named_modules())
            groups = {}
            for g in routed.space.groups:
                mod = mods[g.root[len(prefix):]] if prefix else mods[g.root]
                pr = dg.get_pruner_of_module(mod)
                groups[g.root] = dg.get_pruning_group(mod, pr.prune_out_channels, list(range(g.size)))
            self._probe = (plain, groups)
        plain, groups = self._probe
        # copy current shared weights and ticket k's norm statistics into the probe
        src = routed.plain_copy(k).state_dict()
        plain.load_state_dict(src)
        imp_fn = self.importance or tp.importance.GroupMagnitudeImportance(p=1)
        out = {}
        with torch.no_grad():
            for g in routed.space.groups:
                imp = imp_fn(groups[g.root])
                if imp is None:
                    imp = torch.ones(g.size)
                out[g.root] = imp.detach().float().cpu()
        return out

    def _prune_channels(self, k: int, target: float) -> dict[str, torch.Tensor]:
        """One channel round: rank the surviving channel positions of all groups by importance normalised
        within their group (mean 1 over the group's alive positions), drop the lowest ``prune_fraction`` of
        them (never the last position of a group) and, if that overshoots ``target``, the smallest count
        that reaches it (bisection over the count; sparsity is monotone in it)."""
        routed = self.routed
        keep = {n: m[k].clone() for n, m in routed.tickets.masks.items()}
        imps = self._channel_importance(k)
        cands: list[tuple[float, int, str, int]] = []  # (normalised importance, order, group, position)
        alive_of = {}
        for gi, g in enumerate(routed.space.groups):
            per = keep[g.root].cpu().view(g.ch_groups, g.period)[0]
            imp = imps[g.root].view(g.ch_groups, g.period).mean(0)
            alive = per.nonzero().flatten()
            alive_of[g.root] = int(alive.numel())
            if alive.numel() < 2:
                continue
            a = imp[alive].float()
            a = a / a.abs().mean().clamp_min(1e-12)
            for pos, v in zip(alive.tolist(), a.tolist()):
                cands.append((v, len(cands), g.root, pos))
        cands.sort()
        groups = {g.root: g for g in routed.space.groups}

        def apply(n: int) -> dict[str, torch.Tensor]:
            per = {r: keep[r].cpu().view(groups[r].ch_groups, groups[r].period)[0].clone() for r in groups}
            left = dict(alive_of)
            done = 0
            for _, _, root, pos in cands:
                if done >= n:
                    break
                if left[root] <= 1:
                    continue  # keep >= 1 position per group (a physically pruned layer needs a channel)
                per[root][pos] = False
                left[root] -= 1
                done += 1
            return {r: per[r].repeat(groups[r].ch_groups).to(keep[r].device) for r in groups}

        def sparsity_of(masks) -> float:
            lm = routed.space.channel_layer_masks({n: v.unsqueeze(0) for n, v in masks.items()})
            em = routed.space.weight_element_masks(lm, 1, device=next(iter(masks.values())).device)
            return 1.0 - sum(int(m.sum()) for m in em.values()) / routed.space.num_weights

        if not cands:
            return keep
        n = max(1, math.ceil(self.prune_fraction * len(cands)))
        cand = apply(n)
        if sparsity_of(cand) <= target + 1e-9:
            return cand
        lo, hi = 0, n  # smallest count that reaches the target
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if sparsity_of(apply(mid)) >= target - 1e-12:
                hi = mid
            else:
                lo = mid
        return apply(hi)


class TicketImportance:
    """A torch-pruning importance that ranks channels by what ticket k keeps (interop with stock tp pruners).

    ``tp.pruner.BasePruner(plain_model, example_inputs, importance=TicketImportance(routed, k), ...)``
    hard-prunes first the channels ticket k does not use: channel mode, channels the ticket drops get
    -inf and kept ones the base importance; weight mode, a channel's score is the L1 norm of ticket k's
    kept weights in it (0 when the ticket keeps none).

    Args:
        routed: the RoutedModel whose ticket defines the ranking.
        k: ticket id.
        base: a tp importance for kept channels (default ``GroupMagnitudeImportance(p=1)``).
    """

    def __init__(self, routed, k: int, base=None):
        import torch_pruning as tp
        routed.tickets.check_index(k)
        self.routed = routed
        self.k = int(k)
        self.base = base or tp.importance.GroupMagnitudeImportance(p=1)

    def _root_name(self, group) -> str | None:
        dg = getattr(group, "_DG", None)
        if dg is None:
            return None
        return dg._module2name.get(group[0].dep.target.module)

    @torch.no_grad()
    def __call__(self, group) -> torch.Tensor:
        import torch_pruning as tp  # noqa: F401
        base = self.base(group)
        if base is None:
            return None
        name = self._root_name(group)
        prefix = self.routed.space.trace_root + "." if self.routed.space.trace_root else ""
        full = prefix + name if name is not None else None
        n = len(group[0].idxs)
        if self.routed.granularity == "channel":
            kv = self.routed.tickets.masks.get(full)
            if kv is None or kv.shape[1] != n:
                return base
            keep = kv[self.k].to(base.device)
            return torch.where(keep, base, torch.full_like(base, -float("inf")))
        # weight mode: per-channel L1 of the ticket's kept weights over the group's out-channel layers
        score = torch.zeros(n, device=base.device)
        masks = self.routed.tickets.masks
        for item in group:
            dep, idxs = item.dep, item.idxs
            mname = group._DG._module2name.get(dep.target.module) if isinstance(dep.target.module, nn.Module) else None
            if mname is None:
                continue
            mfull = prefix + mname
            if mfull not in masks or not group._DG.is_out_channel_pruning_fn(dep.handler):
                continue
            w = self.routed.prunable_weights()[mfull]
            m = masks[mfull][self.k]
            kind = self.routed.space.layer_kinds[mfull]
            wm = (w * m).abs()
            per_out = wm.transpose(0, 1).flatten(1).sum(1) if kind == "convT" else wm.flatten(1).sum(1)
            root_idxs = torch.as_tensor(item.root_idxs, device=base.device)
            score.index_add_(0, root_idxs, per_out[torch.as_tensor(idxs)].to(score.device).float())
        return score
