"""newsletter: compose, render, preview and send a curated newsletter."""

__version__ = "0.1.0"
