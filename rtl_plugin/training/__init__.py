"""Stage 2: joint retraining of the tickets with masked updates (one process or torchrun), and the training-loop
pieces the ticket search shares (train steps, balanced cyclic batching, the optimizer convention)."""
from rtl_plugin.training.learned import Binarisation, LearnedTickets, learn_tickets, recalibrate_norms
from rtl_plugin.training.loop import balanced_cyclic_batches, default_train_step
from rtl_plugin.training.masked import MaskedUpdate, write_back_needed
from rtl_plugin.training.optim import clone_optimizer
from rtl_plugin.training.retrain import joint_retrain, mixed_route_retrain, retrain_tickets

__all__ = ["MaskedUpdate", "balanced_cyclic_batches", "clone_optimizer", "default_train_step", "joint_retrain",
           "mixed_route_retrain", "retrain_tickets", "write_back_needed"]
__all__ += ["Binarisation", "LearnedTickets", "learn_tickets", "recalibrate_norms"]
