"""mixspec: one spec for mixed-strategy fine-tuning, compiled to real training backends."""

__version__ = "0.1.0"
