"""NumPy float64 twins of the moe ops."""
__all__ = []
