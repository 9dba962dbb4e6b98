"""The version of fxcache, in one place (the package root, export metadata and pyproject.toml read it)."""

__version__ = "0.1.0"
