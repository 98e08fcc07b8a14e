"""NumPy float64 twins of the losses ops."""
__all__ = []
