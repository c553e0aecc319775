"""lorad: drop a YAML job spec into a folder, get back a fine-tuned model."""

__version__ = "0.1.0"
