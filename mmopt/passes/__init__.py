"""Passes: one file each, a ``Config`` (pydantic) plus ``apply`` and, when the structure changes, ``restore``."""
