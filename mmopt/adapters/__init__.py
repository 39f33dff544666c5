"""One adapter per model family: all family knowledge, and the only code that imports open_clip and transformers."""
