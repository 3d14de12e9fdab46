"""Stage 2: joint retraining of the tickets with masked updates (one process or torchrun)."""
from rtl_plugin.training.retrain import joint_retrain, mixed_route_retrain

__all__ = ["joint_retrain", "mixed_route_retrain"]
