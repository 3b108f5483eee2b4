"""circuitlib: circuit analysis of transformer attention heads (MAPS scores, patching, overlap)."""
__version__ = "0.1.0"
