"""Files: save/load of routed models, resumable checkpoints, ticket export and deployable packages."""
from rtl_plugin.persist.export import export_ticket, pruning_history
from rtl_plugin.persist.io import load, load_tickets, save
from rtl_plugin.persist.package import SlimRoutedModel, export_onnx, export_package, load_package

__all__ = ["SlimRoutedModel", "export_onnx", "export_package", "export_ticket", "load", "load_package", "load_tickets",
           "pruning_history", "save"]
