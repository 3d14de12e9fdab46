"""rtl-plugin: Routing the Lottery for Torch-Pruning."""
__version__ = "0.1.0"
