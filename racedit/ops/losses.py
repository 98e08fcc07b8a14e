"""losses ops (filled by the losses area)."""
__all__ = []
