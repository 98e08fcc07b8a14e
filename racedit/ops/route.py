"""route ops (filled by the route area)."""
__all__ = []
