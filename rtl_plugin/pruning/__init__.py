"""Ticket search: per-subset iterative magnitude pruning (``RTLPruner``, a loop over public steps) and a
per-ticket tp importance."""
from rtl_plugin.pruning.importance import TicketImportance
from rtl_plugin.pruning.learned import TicketScores, sparsity_schedule
from rtl_plugin.pruning.pruner import RTLPruner, validate_sparsities
from rtl_plugin.pruning.search_state import RoundRecord, SearchResult, SearchState
from rtl_plugin.pruning.straight_through import StraightThrough

__all__ = ["RTLPruner", "RoundRecord", "SearchResult", "SearchState", "TicketImportance", "validate_sparsities"]
__all__ += ["StraightThrough", "TicketScores", "sparsity_schedule"]
