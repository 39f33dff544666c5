"""Passes: one file each, a ``PassConfig`` and a ``Pass`` subclass (``base.py``); ``registry.PASSES`` names them."""
