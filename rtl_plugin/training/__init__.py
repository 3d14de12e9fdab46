"""Stage 2: joint retraining of the tickets with masked updates (one process or torchrun), and the public pieces
for a plain PyTorch loop: :class:`TicketOptimizer` (ticket-masked steps, per-ticket or shared state, LR schedulers
reach every state), :class:`RouteBalancedSampler` / :class:`RoutedDataset` (``(x, y, route)`` batches in balanced
cyclic order), plus the train steps, balanced cyclic batching and the optimizer convention."""
from rtl_plugin.training.learned import Binarisation, LearnedTickets, learn_tickets, recalibrate_norms
from rtl_plugin.training.loop import balanced_cyclic_batches, default_train_step
from rtl_plugin.training.masked import MaskedUpdate, write_back_needed
from rtl_plugin.training.optim import clone_optimizer
from rtl_plugin.training.retrain import joint_retrain, mixed_route_retrain, retrain_tickets
from rtl_plugin.training.sampler import RouteBalancedSampler, RoutedDataset
from rtl_plugin.training.ticket_optimizer import TicketOptimizer

__all__ = ["MaskedUpdate", "RouteBalancedSampler", "RoutedDataset", "TicketOptimizer", "balanced_cyclic_batches",
           "clone_optimizer", "default_train_step", "joint_retrain", "mixed_route_retrain", "retrain_tickets",
           "write_back_needed"]
__all__ += ["Binarisation", "LearnedTickets", "learn_tickets", "recalibrate_norms"]
