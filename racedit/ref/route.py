"""NumPy float64 twins of the route ops."""
__all__ = []
