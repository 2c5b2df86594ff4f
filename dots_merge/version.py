"""The package version (a module of its own, so that any stage may read it without importing the others)."""

__version__ = "0.1.0"
