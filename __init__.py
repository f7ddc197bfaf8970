"""dpo: Direct Preference Optimization as independent, resumable pipeline stages."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("dpo")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+local"
