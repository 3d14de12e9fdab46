"""Ticket search: per-subset iterative magnitude pruning (``RTLPruner``) and a per-ticket tp importance."""
from rtl_plugin.pruning.pruner import RTLPruner, SearchResult, TicketImportance

__all__ = ["RTLPruner", "SearchResult", "TicketImportance"]
