"""Ticket search: per-subset iterative magnitude pruning (``RTLPruner``, a loop over public steps) and a
per-ticket tp importance."""
from rtl_plugin.pruning.importance import TicketImportance
from rtl_plugin.pruning.pruner import RTLPruner, validate_sparsities
from rtl_plugin.pruning.search_state import RoundRecord, SearchResult, SearchState

__all__ = ["RTLPruner", "RoundRecord", "SearchResult", "SearchState", "TicketImportance", "validate_sparsities"]
