"""poolmgr: a GPU pool manager daemon for LLM engines."""

__version__ = "0.1.0"

__all__ = ["__version__"]
