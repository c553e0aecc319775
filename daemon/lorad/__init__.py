"""lorad: drop a YAML job spec into a folder; get back a fine-tuned model you can `ollama run`."""

from importlib import metadata

try:
    __version__ = metadata.version("lorad")
except metadata.PackageNotFoundError:  # run from a checkout that was never installed
    __version__ = "0+unknown"
