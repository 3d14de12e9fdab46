"""RTLPruner: K tickets searched inside one model, driven like a torch-pruning pruner.

``RTLPruner`` is a ``torch_pruning.pruner.BasePruner``. It is constructed like one (``model, example_inputs,
importance=, pruning_ratio=, iterative_steps=, ignored_layers=, round_to=, ...`` plus ``num_tickets=``) and the
user's loop calls ``pruner.begin(k)`` (select ticket k, rewind the shared weights) and ``pruner.step()`` (prune
one iterative step of ticket k, as soft masks). In channel granularity the groups torch-pruning's own machinery
selects for that step become ticket k's dropped channels (see :mod:`rtl_plugin.pruning.ticket_tp`); in weight
granularity an element-level importance drops the same ratio of weights.

The paper's schedule (per-subset iterative magnitude pruning with rewinding toward weight ``sparsities``) is the
other schedule of the same pruner; :meth:`RTLPruner.find_tickets` runs either as a loop over the public steps
(:meth:`~RTLPruner.begin`, :meth:`~RTLPruner.rewind`, :meth:`~RTLPruner.train_ticket`, :meth:`~RTLPruner.step`,
:meth:`~RTLPruner.finish_search`) that a hand-written loop can call too.
"""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn as nn

from rtl_plugin import _tp
from rtl_plugin.errors import CallbackError, DataError, RTLError, SparsityError, TicketError
from rtl_plugin.persist.checkpoint import loaders_config
from rtl_plugin.pruning.config import PruningConfig, build_config, validate_sparsities
from rtl_plugin.pruning.element import check_element_importance, element_scores, prune_weights_per_layer
from rtl_plugin.pruning.gradients import (check_channel_importance, copy_gradients, estimate_gradients,
                                          needs_gradients, require_gradients)
from rtl_plugin.pruning.grouped_search import check_grouped_run, check_search_execution, run_grouped_search
from rtl_plugin.pruning.importance import TicketImportance
from rtl_plugin.pruning.ranking import (channel_weight_sparsity, kth_smallest, magnitude_scores, prune_weights_global,
                                        prune_weights_layerwise, select_channels)
from rtl_plugin.pruning.search_state import (RoundRecord, SearchResult, SearchState, TicketProgress, load_search,
                                             save_search)
from rtl_plugin.pruning.ticket_tp import TicketTpState, tp_arguments
from rtl_plugin.routed import RoutedModel
from rtl_plugin.tickets import TicketSet
from rtl_plugin.training import distributed
from rtl_plugin.training.loop import TrainStep, balanced_cyclic_batches, default_train_step, normalize_subsets, \
    progress_bar, to_device
from rtl_plugin.training.optim import check_optimizer, fresh_optimizers, warn_factory_deprecated

__all__ = ["RTLPruner", "SearchResult", "RoundRecord", "TicketImportance", "validate_sparsities", "kth_smallest",
           "magnitude_scores"]


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True)
class _RoundTraining:
    """How find_tickets trains a ticket in every round: the step, passes per round, device, a maker of fresh
    optimizers, and the loss and batch count of the importance gradients."""
    train_step: TrainStep
    epochs: int
    device: object
    make_optimizer: Callable[[], torch.optim.Optimizer]
    loss_fn: Callable | None
    importance_batches: int


def _pruner_callbacks(callbacks) -> list:
    """``callbacks`` as a list: one callback or a sequence of them (callables and/or objects with
    ``on_round_end`` / ``on_trained``)."""
    def ok(cb) -> bool:
        return callable(cb) or hasattr(cb, "on_round_end") or hasattr(cb, "on_trained")
    if callbacks is None:
        return []
    cbs = [callbacks] if ok(callbacks) else callbacks
    if isinstance(cbs, (str, bytes)) or not isinstance(cbs, Sequence) or not all(ok(cb) for cb in cbs):
        raise CallbackError(f"RTLPruner: callbacks must be a callback cb(event) -> 'stop' | None (or an object with "
                            f"on_round_end / on_trained, such as CollapseMonitor) or a list of them, got "
                            f"{type(callbacks).__name__}.")
    return list(cbs)


def _routed_model(model, example_inputs, num_tickets, granularity, ignored) -> RoutedModel:
    """``model`` itself when it is a RoutedModel (checked against the arguments), else ``rtl.wrap(model, ...)``."""
    if isinstance(model, RoutedModel):
        if num_tickets is not None and num_tickets != model.num_tickets:
            raise TicketError(f"num_tickets={num_tickets} but the RoutedModel routes {model.num_tickets} tickets; "
                              "drop num_tickets= or re-wrap the model.")
        if granularity is not None and granularity != model.granularity:
            raise SparsityError(f"granularity={granularity!r} but the RoutedModel is {model.granularity!r}; the "
                                "granularity is fixed at wrap: drop granularity= or re-wrap.")
        excluded = set(model.space.output_layers) | set(model.space.ignored_layers)
        missing = [n for n in ignored if n not in excluded]
        if missing:
            raise SparsityError(f"ignored_layers {missing} are pruned by this RoutedModel's ticket space; pass them "
                                "to rtl.wrap(..., ignored_layers=[...]) or pass the plain model to RTLPruner.")
        return model
    if not isinstance(model, nn.Module):
        raise TypeError(f"RTLPruner needs an nn.Module or a RoutedModel (rtl.wrap(model, K)), got "
                        f"{type(model).__name__}.")
    if num_tickets is None:
        raise TicketError("RTLPruner(model, example_inputs, num_tickets=K, ...): give the number of tickets K "
                          "(or pass a RoutedModel from rtl.wrap).")
    from rtl_plugin.wrapping import wrap  # wrapping imports the training package, which the pruner also needs
    return wrap(model, num_tickets, example_inputs=example_inputs, granularity=granularity or "channel",
                ignored_layers=list(ignored))


def _example_inputs(routed: RoutedModel, example_inputs, config: PruningConfig):
    """The tracing input torch-pruning's schedule needs in channel mode (None when nothing traces)."""
    if example_inputs is not None:
        return example_inputs
    shape = routed.space.example_input_shape
    if shape is None:
        if routed.granularity == "channel" and config.uses_ratio:
            raise SparsityError("the ticket space has no example input shape; pass example_inputs= to RTLPruner.")
        return None
    p = next(routed.model.parameters())
    return torch.zeros(shape, device=p.device, dtype=p.dtype)


class RTLPruner(_tp.BasePruner):
    """K tickets in one model, pruned with torch-pruning's idiom (a ``tp.pruner.BasePruner``).

    Args:
        model: the plain model (wrapped with ``rtl.wrap`` here) or a RoutedModel.
        example_inputs: tracing input (default for a RoutedModel: zeros of its space's example shape).
        num_tickets: K (required for a plain model).
        importance: a ``torch_pruning.importance`` criterion. Channel mode: any of magnitude (any p, group
            reduction), Taylor, Hessian, BN-scale, LAMP, FPGM, random (default group L1 magnitude). Weight mode:
            an element-level one (magnitude, Taylor, random; default |w|). Taylor/Hessian rank with gradients of
            the current ticket's loss (call ``loss.backward()`` before ``step()``; find_tickets estimates them).
        pruning_ratio: torch-pruning's schedule ("ratio"): the fraction of channels removed at the last step,
            exactly as in tp (weight mode: of weights). :meth:`ticket_sparsity` reports the weight sparsity.
        pruning_ratio_dict: per-layer ratios ``{module or tuple of modules: ratio}``, as in tp.
        iterative_steps: steps to reach ``pruning_ratio``, as in tp.
        iterative_pruning_ratio_scheduler: ``(ratio, steps) -> ratios``, as in tp (default linear).
        max_pruning_ratio: the most any layer loses, as in tp.
        global_pruning: one ranking over all groups (True) or per layer (False, tp's default).
        round_to: channel counts rounded to a multiple of this, as in tp (channel mode only).
        num_heads: ``{qkv module: heads}`` for attention layers, as in tp.
        ignored_layers: modules never pruned (the output layers are always excluded).
        granularity: "channel" (default for a plain model, as tp prunes channels) or "weight" (the paper).
        rewind: "init" (θ0: the weights when the search begins) or an int t (find_tickets trains dense for t
            steps first and rewinds to θ_t).
        sparsities: the paper's IMP schedule, used when no pruning_ratio / iterative_steps is given: masks
            recorded at each of these weight sparsities. ``target_sparsity=`` is its deprecated name.
        schedule: "auto" (ratio when a tp schedule argument is given, else "fraction"), "ratio", "fraction"
            (remove ``prune_fraction`` of the surviving weights per round) or "count" (``prune_count`` per round).
        prune_fraction: IMP: the fraction of the survivors removed per round.
        prune_count: IMP with schedule "count": weights removed per round (the paper: 4,096).
        scope: IMP, weight mode: "global" ranking (the paper) or "layer".
        order: find_tickets: "ticket" (each ticket's search in turn) or "round" (all tickets advance together).
        max_relaxations: find_tickets, round order: how often a round-end callback may halve the fraction.
        callbacks: find_tickets: a callback or a list (see :meth:`find_tickets`).
        search_execution: find_tickets: "sequential" (each ticket's round in turn, the default) or "grouped" (every
            round of all tickets trained as ONE vectorised network: stacked weights, ``torch.func.vmap``, one
            optimizer over the stacked state; weight granularity, default train step, SGD / Adam / AdamW /
            Adamax / RMSprop). Masks equal the sequential search's up to float rounding at the pruning threshold
            (float64 on CPU: equal in the tests); see :mod:`rtl_plugin.pruning.grouped_search`.
        progress: show progress bars.
        importance_batches: batches of ticket k's data find_tickets uses for gradient importances.
        **tp_options: further torch-pruning options (``isomorphic``, ``prune_num_heads``, ``prune_head_dims``,
            ``head_pruning_ratio``, ``customized_pruners``, ``forward_fn``, ``output_transform``).
    """

    def __init__(self, model, example_inputs=None, *, num_tickets: int | None = None, importance=None,
                 pruning_ratio: float | None = None, pruning_ratio_dict: dict | None = None,
                 iterative_steps: int | None = None, iterative_pruning_ratio_scheduler: Callable | None = None,
                 max_pruning_ratio: float = 1.0, global_pruning: bool | None = None, round_to: int | None = None,
                 ignored_layers: Sequence | None = None, num_heads: dict | None = None,
                 granularity: str | None = None, rewind: str | int = "init",
                 sparsities: Sequence[float] | None = None, schedule: str = "auto", prune_fraction: float = 0.2,
                 prune_count: int | None = None, scope: str = "global", order: str = "ticket",
                 max_relaxations: int = 2, callbacks: Sequence[Callable[[dict], object]] | Callable = (),
                 progress: bool = True, importance_batches: int = 4, target_sparsity: Sequence[float] | None = None,
                 search_execution: str = "sequential", **tp_options):
        names_model = model.model if isinstance(model, RoutedModel) else model
        if not isinstance(names_model, nn.Module):
            raise TypeError(f"RTLPruner needs an nn.Module or a RoutedModel (rtl.wrap(model, K)), got "
                            f"{type(model).__name__}.")
        args = dict(schedule=schedule, sparsities=sparsities, target_sparsity=target_sparsity,
                    prune_fraction=prune_fraction, prune_count=prune_count, rewind=rewind, scope=scope, order=order,
                    max_relaxations=max_relaxations, pruning_ratio=pruning_ratio, pruning_ratio_dict=pruning_ratio_dict,
                    iterative_steps=iterative_steps, scheduler=iterative_pruning_ratio_scheduler or _tp.linear_scheduler,
                    global_pruning=global_pruning, max_pruning_ratio=max_pruning_ratio, round_to=round_to,
                    num_heads=num_heads, ignored_layers=ignored_layers, tp_options=tp_options)
        gran = model.granularity if isinstance(model, RoutedModel) else (granularity or "channel")
        if gran not in ("weight", "channel"):
            raise SparsityError(f"granularity must be 'weight' or 'channel', got {gran!r}.")
        config = build_config(names_model, gran, args)
        routed = _routed_model(model, example_inputs, num_tickets, granularity, config.ignored_layers)
        self._init_base(routed, config, importance, _example_inputs(routed, example_inputs, config))
        self._init_search(routed, config, callbacks, progress, importance_batches)
        self.search_execution = check_search_execution(search_execution, routed.granularity)

    def _init_base(self, routed: RoutedModel, config: PruningConfig, importance, example_inputs) -> None:
        """torch-pruning's own state over a dense plain copy (channel mode, tp's schedule): ``self.DG``,
        ``self.model``, ``per_step_pruning_ratio`` ... as in any tp pruner; otherwise its public attributes."""
        if routed.granularity == "channel":
            check_channel_importance(importance)
            importance = importance or _tp.default_importance()
        else:
            check_element_importance(importance)
        self.example_inputs = example_inputs
        if routed.granularity == "channel" and config.uses_ratio:
            template = routed.plain_copy(0)
            root = template.get_submodule(routed.space.trace_root) if routed.space.trace_root else template
            excluded = list(routed.space.output_layers) + list(routed.space.ignored_layers)
            prefix = routed.space.trace_root + "." if routed.space.trace_root else ""
            with _tp.tracing(root):
                super().__init__(root, example_inputs, importance=importance,
                                 **tp_arguments(config, root, prefix, excluded))
            return
        self.model, self.importance, self.DG = routed.model, importance, None
        self.pruning_ratio, self.iterative_steps = config.pruning_ratio, config.iterative_steps
        self.pruning_ratio_dict, self.global_pruning = dict(config.pruning_ratio_dict), config.global_pruning
        self.max_pruning_ratio, self.round_to = config.max_pruning_ratio, config.round_to
        self.ignored_layers = [routed.model.get_submodule(n) for n in config.ignored_layers]
        self.per_step_pruning_ratio = [0.0] + list(config.targets) if config.uses_ratio else [0.0]
        self.current_step = 0

    def _init_search(self, routed, config, callbacks, progress, importance_batches) -> None:
        callbacks = _pruner_callbacks(callbacks)
        if not _is_int(importance_batches) or importance_batches < 1:
            raise DataError(f"importance_batches must be a positive int, got {importance_batches!r}.")
        self.routed = routed
        self.config = config
        self.sparsities = list(config.targets)
        self.schedule = config.schedule
        self.prune_fraction = config.prune_fraction
        self.scope, self.order = config.scope, config.order
        self.max_relaxations, self.prune_count, self.rewind_to = config.max_relaxations, config.prune_count, config.rewind
        self.callbacks = list(callbacks)
        self.progress = progress
        self.importance_batches = importance_batches
        self.result: SearchResult | None = None
        self.state: SearchState | None = None
        self.current: int | None = None
        self._probe = None
        self._ticket_tp: dict[int, TicketTpState] = {}

    @property
    def tickets(self) -> TicketSet:
        """The current masks of all K tickets (``pruner.routed.tickets``)."""
        return self.routed.tickets

    @property
    def targets(self) -> list[float]:
        """Where masks are recorded: tp's ratio after each step (schedule "ratio") or the weight sparsities."""
        return self.sparsities

    @property
    def round_fraction(self) -> float:
        """The fraction pruned per round now: ``prune_fraction`` halved once per round-end relaxation."""
        relaxations = 0 if self.state is None else self.state.relaxations
        return self.prune_fraction / 2 ** relaxations

    # ------------------------------------------------------------------ public steps
    def begin_search(self, tickets: Sequence[int] | None = None) -> SearchState:
        """Start searching ``tickets`` (default: all K): the current shared weights become the rewind point θ,
        the searched tickets' masks become dense (the others keep theirs) and nothing is recorded yet.

        With ``rewind=t`` call :meth:`dense_warmup` first, so that θ is θ_t. Returns the new :attr:`state`,
        which the other steps advance."""
        K = self.routed.num_tickets
        which = list(range(K)) if tickets is None else list(tickets)
        if not which:
            raise TicketError("begin_search got no tickets; pass ticket ids in [0, K) or None for all.")
        for k in which:
            if not _is_int(k) or not 0 <= k < K:
                raise TicketError(f"ticket {k!r} is outside [0, {K}); the model routes {K} tickets.")
        if len(set(which)) != len(which):
            raise TicketError(f"tickets {which} name a ticket twice; give each ticket once.")
        routed = self.routed
        theta = {k: v.detach().clone() for k, v in routed.model.state_dict().items()}
        start = routed.tickets.copy()
        self.state = SearchState(theta=theta, start=start, recorded={t: {} for t in self.sparsities},
                                 progress={k: TicketProgress() for k in which})
        for k in which:  # every searched ticket starts dense
            routed.set_ticket(k, {n: torch.ones_like(m[k]) for n, m in start.masks.items()})
        self._ticket_tp = {}
        return self.state

    def begin(self, k: int) -> None:
        """Select ticket k and rewind the shared weights to θ (starting the search of all K tickets at the first
        call: the current weights become θ and every ticket starts dense). Then train ticket k in your own loop
        (``routed(x, route=k)``, masked updates) and call :meth:`step`."""
        if self.state is None:
            self.begin_search()
        self.rewind(k)

    def step(self, interactive: bool = False) -> None:
        """Prune one iterative step of the current ticket (the one :meth:`begin` / :meth:`rewind` selected) as
        soft masks: schedule "ratio", torch-pruning's next ratio (channel mode: the groups tp's own machinery
        selects); the IMP schedules, one round toward the next sparsity. Gradient importances use the gradients
        the shared weights hold now. ``interactive=True`` is refused: the groups are not removed but masked."""
        if interactive:
            raise RTLError("RTLPruner.step(interactive=True) is not supported: RTL does not remove the groups tp "
                           "selects, it masks them in the current ticket. Call step().")
        if self.current is None:
            raise RTLError("no ticket selected; call pruner.begin(k) before pruner.step().")
        self.prune_round(self.current)

    def ticket_done(self, k: int | None = None) -> bool:
        """Whether ticket k (default: the current one) has reached its last target."""
        k = self.current if k is None else k
        if k is None:
            raise RTLError("no ticket selected; call pruner.begin(k) or pass k.")
        return self.record_targets(k) is None

    def pruning_history(self, k: int | None = None) -> list:
        """torch-pruning's pruning history of ticket k (default: the current one): what ``export_ticket``
        replays (channel mode)."""
        from rtl_plugin.persist.export import pruning_history  # persist.export imports routed, not the pruner
        k = self.current if k is None else k
        if k is None:
            raise RTLError("no ticket selected; call pruner.begin(k) or pass k.")
        return pruning_history(self.routed, k)

    def _progress_of(self, k: int) -> TicketProgress:
        if self.state is None:
            raise RTLError("no search in progress; call pruner.begin_search(tickets) first (find_tickets does).")
        if not _is_int(k) or k not in self.state.progress:
            raise TicketError(f"ticket {k!r} is not being searched (searched: {list(self.state.progress)}); "
                              "pass one of those or begin_search(tickets=[...]) with it.")
        return self.state.progress[k]

    def ticket_sparsity(self, k: int) -> float:
        """Ticket k's sparsity without counting the other K - 1 tickets (weight mode: its masks directly)."""
        self.routed.tickets.check_index(k)
        ts = self.routed.tickets
        if self.routed.granularity != "weight":
            return channel_weight_sparsity(self.routed.space, {n: m[k] for n, m in ts.masks.items()})
        kept = sum(int(m[k].sum()) for m in ts.masks.values())
        return 1.0 - kept / self.routed.space.num_weights

    def record_targets(self, k: int) -> float | None:
        """Record ticket k's current masks at every target its sparsity has reached (at every remaining target
        once the ticket is stopped), in order. Returns the next target ticket k prunes toward, or None when
        its search is done."""
        prog = self._progress_of(k)
        while prog.target_index < len(self.sparsities):
            target = self.sparsities[prog.target_index]
            if not prog.stopped and not self._reached(k, prog, target):
                return target
            masks = {n: m[k].clone() for n, m in self.routed.tickets.masks.items()}
            self.state.recorded[target][k] = masks
            prog.target_index += 1
        return None

    def _reached(self, k: int, prog: TicketProgress, target: float) -> bool:
        if self.config.uses_ratio:
            return prog.rounds >= prog.target_index + 1
        return self.ticket_sparsity(k) >= target - 1e-9

    def rewind(self, k: int | None = None) -> None:
        """Select ticket k (default: the current one) for its next round: load the rewind weights θ into the
        shared model."""
        k = self.current if k is None else k
        self._progress_of(k)
        self.routed.model.load_state_dict(self.state.theta)
        self.current = k
        self.current_step = self.state.progress[k].rounds

    def train_ticket(self, k: int, loader, *, train_step: TrainStep | None = None, loss_fn: Callable | None = None,
                     optimizer: torch.optim.Optimizer | None = None, epochs: int = 1, device=None) -> float:
        """Train ticket k (its masks applied) for ``epochs`` passes over ``loader``; returns the mean loss (under
        torchrun: the mean over ranks, the same on every rank).

        ``optimizer``: an optimizer instance over ``routed.parameters()``, used as is (pass a fresh one per round,
        e.g. ``training.clone_optimizer(opt)``, for IMP with fresh state; find_tickets does); None: a fresh
        Adam(lr=1e-3). ``train_step(model, batch, optimizer) -> loss`` (default cross-entropy on (x, y))."""
        self.routed.tickets.check_index(k)
        if not _is_int(epochs) or epochs < 1:
            raise DataError(f"epochs must be a positive int, got {epochs!r}.")
        if train_step is not None and not callable(train_step):
            raise DataError(f"train_step must be callable (model, batch, optimizer) -> loss, got {type(train_step).__name__}.")
        opt = fresh_optimizers(self.routed)() if optimizer is None else check_optimizer(self.routed, optimizer)
        return self._train_ticket(k, loader, train_step or default_train_step(loss_fn), opt, epochs, device)

    def prune_round(self, k: int, *, loss: float = float("nan")) -> float:
        """One pruning round of ticket k toward its next target (see :meth:`record_targets`); sets ticket k's
        masks, appends a :class:`RoundRecord` (with ``loss``, the round's training loss) to the history and
        returns the ticket's new sparsity. A round never overshoots the target; a round that can remove
        nothing stops the ticket's search (RuntimeWarning)."""
        prog = self._progress_of(k)
        target = self.record_targets(k)
        if target is None:
            raise SparsityError(f"ticket {k}'s search is done (every target recorded or the ticket stopped); "
                                "call finish_search() to collect the masks.")
        before = self.ticket_sparsity(k)
        self.routed.set_ticket(k, self._prune_round(k, target))
        prog.rounds += 1
        if k == self.current:
            self.current_step = prog.rounds
        sp = self.ticket_sparsity(k)
        self.state.history.append(RoundRecord(ticket=k, round=prog.rounds, sparsity=sp, loss=loss))
        self.state.rounds_done += 1
        if not self.config.uses_ratio and sp <= before + 1e-12 and not prog.stopped:
            warnings.warn(f"ticket {k}: no weight left to prune at sparsity {sp:.4f} (target {target}); recording "
                          "the sparsest reachable masks.", RuntimeWarning, stacklevel=2)
            prog.stopped = True
        return sp

    def stop_ticket(self, k: int) -> None:
        """End ticket k's search: its current masks are recorded for every remaining target."""
        prog = self._progress_of(k)
        prog.stopped = True  # a round that pruned nothing may have stopped it already: still a requested stop
        self.state.stopped.setdefault(k, prog.rounds)

    def finish_search(self) -> SearchResult:
        """End the search: rewind the weights to θ, build ``tickets_at[sparsity]`` (unsearched tickets and
        unrecorded targets keep the masks from before the search) and set the last target's masks."""
        if self.state is None:
            raise RTLError("no search in progress; call pruner.begin_search(tickets) first.")
        state, routed = self.state, self.routed
        for k in state.progress:
            self.record_targets(k)
        routed.model.load_state_dict(state.theta)
        tickets_at = {}
        for t, per in state.recorded.items():
            new = {n: m.clone() for n, m in state.start.masks.items()}
            for k, mk in per.items():
                for n in new:
                    new[n][k] = mk[n]
            tickets_at[t] = TicketSet(routed.space, new)
        routed.set_tickets(tickets_at[self.sparsities[-1]])
        self.result = SearchResult(tickets_at=tickets_at, history=state.history,
                                   wall_time_s=time.perf_counter() - state.started, stopped=state.stopped)
        self.state, self.current, self._ticket_tp = None, None, {}
        return self.result

    def abandon_search(self) -> None:
        """End the search without results: the model gets back its weights θ and its masks from before."""
        if self.state is not None:
            self.routed.model.load_state_dict(self.state.theta)
            self.routed.set_tickets(self.state.start)
            self.state, self.current, self._ticket_tp = None, None, {}

    def dense_warmup(self, loaders, *, steps: int, train_step: TrainStep | None = None,
                     loss_fn: Callable | None = None, optimizer: torch.optim.Optimizer | None = None,
                     device=None) -> None:
        """Train every ticket's data on the dense shared weights for ``steps`` batches of balanced cyclic
        batching (the rewind point θ_t of ``rewind=t``); the masks are unchanged afterwards. ``optimizer``: an
        instance over ``routed.parameters()``, used as is (None: Adam(lr=1e-3))."""
        if not _is_int(steps) or steps < 0:
            raise DataError(f"steps must be an int >= 0, got {steps!r}.")
        loaders = normalize_subsets(loaders)
        opt = fresh_optimizers(self.routed)() if optimizer is None else check_optimizer(self.routed, optimizer)
        self._dense_warmup(loaders, train_step or default_train_step(loss_fn), opt, device, steps)

    # ------------------------------------------------------------------ the whole search
    def find_tickets(self, subsets, *, train_step: TrainStep | None = None, loss_fn: Callable | None = None,
                     epochs_per_round: int = 1, optimizer: torch.optim.Optimizer | None = None, device=None,
                     tickets: Sequence[int] | None = None, checkpoint_dir=None, checkpoint_every: int = 1,
                     optimizer_factory: Callable | None = None) -> SearchResult:
        """Run per-subset IMP for every ticket; sets the routed model's masks to the last target.

        With ``RTLPruner(search_execution="grouped")`` every round of all searched tickets trains as one vectorised
        network (:mod:`rtl_plugin.pruning.grouped_search`); ``train_step=`` is refused there.

        Args:
            subsets: ``{ticket: DataLoader}`` (or a list), one per ticket.
            train_step: ``step(model, batch, optimizer) -> loss`` (default cross-entropy).
            epochs_per_round: passes over subset k between two pruning rounds (T in the paper).
            optimizer: an optimizer instance over ``routed.parameters()`` whose configuration (class and
                param-group hyper-parameters) is cloned for every round: fresh state each time (default:
                Adam lr 1e-3). ``optimizer_factory=`` (``params -> optimizer``) is deprecated.
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
        t0 = time.perf_counter()
        if optimizer_factory is not None:
            warn_factory_deprecated(stacklevel=3)
        loaders, which = self._search_loaders(subsets, tickets, epochs_per_round, checkpoint_every)
        make_optimizer = fresh_optimizers(self.routed, optimizer, optimizer_factory)
        if self.search_execution == "grouped":
            check_grouped_run(self.routed, train_step=train_step, make_optimizer=make_optimizer)
        train = _RoundTraining(train_step or default_train_step(loss_fn), epochs_per_round, device, make_optimizer,
                               loss_fn, self.importance_batches)
        ck = None if checkpoint_dir is None else (checkpoint_dir, self._checkpoint_config(loaders, which, epochs_per_round))
        state = load_search(ck, self.routed, loaders, self.sparsities) if ck else None
        if state is None:
            if self.rewind_to != "init" and self.rewind_to > 0:
                self._dense_warmup(loaders, train.train_step, make_optimizer(), device, int(self.rewind_to))
            state = self.begin_search(which)
            if ck:
                save_search(ck, loaders, state, self.routed.tickets, self.sparsities)  # start (and warm-up) state
        else:
            self.state = state
        state.started = t0
        bar = progress_bar(total=len(which) * self._estimate_rounds(), desc="ticket search", enabled=self.progress)
        bar.update(len(state.history))
        try:
            if self.search_execution == "grouped":
                run_grouped_search(self, which, loaders, loss_fn=loss_fn, make_optimizer=make_optimizer,
                                   epochs=epochs_per_round, device=device, bar=bar, checkpoint=ck,
                                   checkpoint_every=checkpoint_every)
            elif self.order == "ticket":
                self._ticket_order(which, loaders, train, bar, ck, checkpoint_every)
            else:
                self._round_order(which, loaders, train, bar, ck, checkpoint_every)
            if ck:  # the finished search: a rerun returns at once
                save_search(ck, loaders, state, self.routed.tickets, self.sparsities)
        except BaseException:
            self.abandon_search()  # an interrupted search leaves the model as it found it
            raise
        finally:
            bar.close()
        return self.finish_search()

    def _search_loaders(self, subsets, tickets, epochs_per_round, checkpoint_every) -> tuple[dict, list[int]]:
        """The checked ``{ticket: loader}`` (torchrun: this rank's shards) and the tickets to search."""
        loaders = normalize_subsets(subsets)
        loaders = distributed.prepare(self.routed, loaders)  # torchrun: rank 0's weights/masks/RNG everywhere
        K = self.routed.num_tickets
        which = sorted(loaders) if tickets is None else list(tickets)
        for k in which:
            if not 0 <= k < K:
                raise TicketError(f"ticket {k} is outside [0, {K}); the model routes {K} tickets.")
            if k not in loaders:
                raise DataError(f"no subset given for ticket {k}; pass one DataLoader per ticket.")
        if not _is_int(epochs_per_round) or epochs_per_round < 1:
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
        if not _is_int(checkpoint_every) or checkpoint_every < 1:
            raise DataError(f"checkpoint_every must be a positive int, got {checkpoint_every!r}.")
        return loaders, which

    def _search_round(self, k: int, loader, train: _RoundTraining, bar) -> bool:
        """Ticket k's next round with the callbacks (after recording every target it has reached); False when
        its search is done."""
        target = self.record_targets(k)
        if target is None:
            return False
        before = self.ticket_sparsity(k)
        self.rewind(k)
        loss = self.train_ticket(k, loader, train_step=train.train_step, optimizer=train.make_optimizer(),
                                 epochs=train.epochs, device=train.device)
        if needs_gradients(self.importance):
            estimate_gradients(self.routed, k, loader, importance=self.importance, loss_fn=train.loss_fn,
                               batches=train.importance_batches, device=train.device)
        sp = self.close_round(k, loss=loss, target=target, before=before)
        bar.update(1)
        bar.set_postfix(ticket=k, sparsity=f"{sp:.3f}")
        return True

    def close_round(self, k: int, *, loss: float, target: float, before: float, callbacks=None) -> float:
        """The end of ticket k's trained round (find_tickets and trainer callbacks): the callbacks'
        ``on_trained``, one pruning round (:meth:`prune_round`), then the round callbacks (a "stop" ends ticket k's
        search). ``before``: the sparsity the round trained at. Returns the new sparsity."""
        callbacks = self.callbacks if callbacks is None else callbacks
        prog = self._progress_of(k)
        trained = {"ticket": k, "round": prog.rounds + 1, "sparsity": before, "target": target, "model": self.routed}
        for cb in callbacks:
            if hasattr(cb, "on_trained"):
                cb.on_trained(trained)
        sp = self.prune_round(k, loss=loss)
        event = {"ticket": k, "round": prog.rounds, "sparsity": sp, "loss": loss, "target": target,
                 "model": self.routed, "masks": {n: m[k].clone() for n, m in self.routed.tickets.masks.items()}
                 } if callbacks else {}
        if any(cb(event) == "stop" for cb in callbacks if callable(cb)):
            self.stop_ticket(k)
        return sp

    def _ticket_order(self, which, loaders, train, bar, ck, checkpoint_every) -> None:
        for k in which:
            while self._search_round(k, loaders[k], train, bar):
                if ck and self.state.rounds_done % checkpoint_every == 0:
                    save_search(ck, loaders, self.state, self.routed.tickets, self.sparsities)

    def _round_order(self, which, loaders, train, bar, ck, checkpoint_every) -> None:
        state = self.state
        snapshot = self.routed.tickets.copy()  # masks at the last healthy round end
        while True:
            moved = [k for k in which if self._search_round(k, loaders[k], train, bar)]
            if not moved:
                break
            snapshot = self.end_sweep(moved, which, snapshot)
            if ck and state.rounds_done % checkpoint_every == 0:
                save_search(ck, loaders, state, self.routed.tickets, self.sparsities)

    def end_sweep(self, moved, searched, snapshot: TicketSet, *, callbacks=None) -> TicketSet:
        """Round order, after every searched ticket moved one round: the round-end callbacks; "stop" / "relax"
        give the ``moved`` tickets back their masks in ``snapshot`` (the last healthy sweep end), "relax" halves
        the prune fraction (at most ``max_relaxations`` times, then acts as "stop"). Returns the new snapshot."""
        state = self.state
        state.sweep += 1
        action = self._round_end(state.sweep, searched, moved, self.callbacks if callbacks is None else callbacks)
        if action in ("stop", "relax"):
            for k in moved:
                self.routed.set_ticket(k, {n: m[k].clone() for n, m in snapshot.masks.items()})
            if action == "relax" and self.schedule == "fraction" and state.relaxations < self.max_relaxations:
                state.relaxations += 1
            else:
                for k in searched:
                    if not state.progress[k].stopped:
                        self.stop_ticket(k)
        return self.routed.tickets.copy()

    def _round_end(self, sweep: int, which, moved, callbacks) -> str | None:
        """Round-end callbacks; the strongest action asked for ("stop" > "relax" > None)."""
        routed = self.routed
        event = {"round": sweep, "tickets": routed.tickets, "active": list(moved), "searched": list(which),
                 "sparsity": [float(s) for s in routed.tickets.sparsity()], "model": routed,
                 "relaxations": self.state.relaxations}
        actions = set()
        for cb in callbacks:
            if hasattr(cb, "on_round_end"):
                a = cb.on_round_end(event)
                if a not in (None, "stop", "relax"):
                    raise RTLError(f"on_round_end returned {a!r}; return None, 'stop' or 'relax'.")
                actions.add(a)
        return "stop" if "stop" in actions else "relax" if "relax" in actions else None

    def _checkpoint_config(self, loaders, which, epochs_per_round) -> dict:
        sp = self.routed.space
        return {"kind": "find_tickets", "fingerprint": sp.fingerprint, "granularity": sp.granularity,
                "num_tickets": self.routed.num_tickets,
                "mask_shapes": {k: list(v) for k, v in sp.mask_shapes().items()},
                "tickets": list(which), "targets": self.sparsities, "schedule": self.schedule,
                "prune_fraction": self.prune_fraction, "prune_count": self.prune_count, "rewind": self.rewind_to,
                "scope": self.scope, "order": self.order, "max_relaxations": self.max_relaxations,
                "pruning_ratio": self.config.pruning_ratio, "iterative_steps": self.config.iterative_steps,
                "global_pruning": self.config.global_pruning, "round_to": self.config.round_to,
                "importance": type(self.importance).__name__ if self.importance is not None else None,
                "epochs_per_round": epochs_per_round, "loaders": loaders_config(loaders)}

    # ------------------------------------------------------------------ internals
    def _estimate_rounds(self) -> int:
        if self.config.uses_ratio:
            return self.config.iterative_steps
        last = self.sparsities[-1]
        if self.schedule == "fraction":
            n = math.ceil(math.log(max(1 - last, 1e-9)) / math.log(1 - self.round_fraction))
            return n + len(self.sparsities)
        return math.ceil(last * self.routed.space.num_weights / self.prune_count)

    def _train_ticket(self, k, loader, step, optimizer, epochs, device) -> float:
        routed = self.routed
        view = distributed.ticket_view(routed, k)  # torchrun: DDP over the RoutedModel, synced batch norms
        was = routed.training
        routed.train()
        total, n = 0.0, 0
        try:
            for _ in range(epochs):
                for batch in loader:
                    loss = step(view, to_device(batch, device), optimizer)
                    total += float(loss or 0.0) * getattr(view, "loss_weight", 1.0)  # torchrun: this shard's share
                    n += 1
        finally:
            routed.train(was)
        if n == 0:
            raise DataError(f"subset {k} yielded no batch; every ticket needs data.")
        return distributed.all_mean(total / n)  # torchrun: the same loss on every rank (callbacks decide alike)

    def _dense_warmup(self, loaders, step, optimizer, device, steps: int) -> None:
        routed = self.routed
        views = distributed.ticket_views(routed, loaders)
        done = 0
        saved = routed.tickets
        routed.set_tickets(TicketSet.full(routed.space, routed.num_tickets, device=saved.device))  # dense warm-up
        was = routed.training
        routed.train()
        try:
            while done < steps:
                for _, k, batch in balanced_cyclic_batches(loaders):
                    step(views[k], to_device(batch, device), optimizer)
                    done += 1
                    if done >= steps:
                        break
        finally:
            routed.set_tickets(saved)
            routed.train(was)

    def _n_to_prune(self, kept: int, target: float) -> int:
        total = self.routed.space.num_weights
        floor_kept = math.floor((1 - target) * total + 1e-9)  # kept <= (1 - target) N  <=>  sparsity >= target
        n = math.ceil(self.round_fraction * kept) if self.schedule == "fraction" else self.prune_count
        return max(0, min(n, kept - floor_kept))

    def _prune_round(self, k: int, target: float) -> dict[str, torch.Tensor]:
        """Ticket k's masks after one round toward ``target`` (torchrun: rank 0's masks on every rank)."""
        _tp.fill_hessian_gradients(self.importance)
        require_gradients(self.routed, self.importance)
        if self.config.uses_ratio:
            prune = self._ratio_weights if self.routed.granularity == "weight" else self._ratio_channels
        else:
            prune = self._prune_weights if self.routed.granularity == "weight" else self._prune_channels
        return distributed.broadcast_masks(prune(k, target))

    def _scores(self, k: int) -> dict[str, torch.Tensor]:
        """Weight mode: element importance of the shared weights (NaN/inf refused)."""
        scores = element_scores(self.routed.prunable_weights(), self.importance)
        for nm, sc in scores.items():
            if not bool(torch.isfinite(sc).all()):
                raise RTLError(f"ticket {k}: layer {nm!r} has NaN/inf weights after training; the search cannot "
                               "rank them. Lower the learning rate or check the data and the train step.")
        return scores

    def _ratio_weights(self, k: int, target: float) -> dict[str, torch.Tensor]:
        """Weight mode, tp's schedule: global ranking down to ``(1 - ratio)`` of all weights, or every layer down
        to ``(1 - its ratio)`` of its weights (``global_pruning=False`` and ``pruning_ratio_dict`` layers)."""
        masks = {n: m[k].clone() for n, m in self.routed.tickets.masks.items()}
        scores = self._scores(k)
        step = self.state.progress[k].rounds + 1
        per_layer = {}
        for name, shape in self.routed.space.layers.items():
            sched = self.config.layer_ratio_schedule(name)
            if sched is not None or not self.config.global_pruning:
                ratio = sched[step] if sched is not None else target
                per_layer[name] = int(masks[name].sum()) - math.floor((1 - ratio) * masks[name].numel() + 1e-9)
        prune_weights_per_layer(masks, scores, per_layer)
        rest = [n for n in masks if n not in per_layer]
        if rest:
            total = sum(masks[n].numel() for n in rest)
            n = sum(int(masks[n].sum()) for n in rest) - math.floor((1 - target) * total + 1e-9)
            if n > 0:
                prune_weights_global({nm: masks[nm] for nm in rest}, {nm: scores[nm] for nm in rest}, n)
        return masks

    def _ratio_channels(self, k: int, target: float) -> dict[str, torch.Tensor]:
        """Channel mode, tp's schedule: ticket k's torch-pruning pruner takes one step on its slim copy; the
        channels it removes are dropped from ticket k's keep-vectors."""
        state = self._ticket_tp.get(k)
        if state is None:
            state = self._ticket_tp[k] = TicketTpState(self.routed, k, self.config, self.importance,
                                                       self.example_inputs, steps_done=self.state.progress[k].rounds)
        keep = {n: m[k].clone() for n, m in self.routed.tickets.masks.items()}
        state.load_from(self.routed)
        for root, idxs in state.step(keep).items():
            keep[root][torch.as_tensor(idxs, dtype=torch.long, device=keep[root].device)] = False
        state.check(keep)
        return keep

    def _prune_weights(self, k: int, target: float) -> dict[str, torch.Tensor]:
        masks = {n: m[k].clone() for n, m in self.routed.tickets.masks.items()}
        scores = self._scores(k)
        kept = int(sum(int(m.sum()) for m in masks.values()))
        n = self._n_to_prune(kept, target)
        if n <= 0:
            return masks
        if self.scope == "layer":
            return prune_weights_layerwise(masks, scores, kept, n)
        return prune_weights_global(masks, scores, n)

    def _importance_probe(self):
        """``(plain model, {group root: tp group})`` built once: a plain copy traced by torch-pruning."""
        if self._probe is None:
            routed = self.routed
            plain = routed.plain_copy(0)
            trace_root = routed.space.trace_root
            root = plain.get_submodule(trace_root) if trace_root else plain
            p = next(root.parameters())
            ex = torch.zeros(routed.space.example_input_shape, device=p.device, dtype=p.dtype)
            dg = _tp.build_graph(root, ex)
            mods = dict(root.named_modules())
            groups = {g.root: _tp.out_channel_group(dg, mods[g.root[len(trace_root) + 1:] if trace_root else g.root],
                                                    range(g.size))
                      for g in routed.space.groups}
            self._probe = (plain, groups)
        return self._probe

    def _channel_importance(self, k: int) -> dict[str, torch.Tensor]:
        """Per-group importance [C_root] of ticket k's trained weights, estimated on the UNMASKED weights."""
        plain, groups = self._importance_probe()
        plain.load_state_dict(self.routed.plain_copy(k).state_dict())  # shared weights, ticket k's norm statistics
        copy_gradients(self.routed, plain)
        imp_fn = self.importance or _tp.default_importance()
        out = {}
        with torch.no_grad():
            for g in self.routed.space.groups:
                imp = imp_fn(groups[g.root])
                if imp is None:
                    imp = torch.ones(g.size)
                out[g.root] = imp.detach().float().cpu()
        return out

    def _prune_channels(self, k: int, target: float) -> dict[str, torch.Tensor]:
        """One channel round: rank the surviving channel positions of all groups by importance normalised
        within their group (mean 1 over the group's alive positions), drop the lowest ``round_fraction`` of
        them (never the last position of a group) and, if that overshoots ``target``, the smallest count
        that reaches it."""
        keep = {n: m[k].clone() for n, m in self.routed.tickets.masks.items()}
        imps = self._channel_importance(k)
        return select_channels(self.routed.space, keep, imps, self.round_fraction, target)
