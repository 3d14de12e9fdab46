"""Ticket similarity, the per-round sweep, the collapse monitor, semantic alignment and run reports."""
from rtl_plugin.diagnostics.collapse import CollapseMonitor, CollapseWarning
from rtl_plugin.diagnostics.semantic import semantic_alignment, wordnet_similarity
from rtl_plugin.diagnostics.similarity import Diagnosis, diagnose
from rtl_plugin.diagnostics.sweep import Sweep, SweepPoint, SweepRecorder

__all__ = ["CollapseMonitor", "CollapseWarning", "Diagnosis", "Sweep", "SweepPoint", "SweepRecorder", "diagnose",
           "semantic_alignment", "wordnet_similarity"]
