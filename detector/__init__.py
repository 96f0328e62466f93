"""mia-detector: detects membership-inference attacks and their relatives in ML prediction-request logs."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("mia-detector")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
