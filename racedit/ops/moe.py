"""moe ops (filled by the moe area)."""
__all__ = []
