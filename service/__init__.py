"""densemap: dense CNN scoring (see README.md)."""

__version__ = "0.1.0"
