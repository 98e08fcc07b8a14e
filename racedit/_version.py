"""The racedit version (a module of its own: racedit.runs records it without importing
the package that imports racedit.runs)."""
__version__ = "0.1.0"
