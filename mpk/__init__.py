"""mpk: compile LLM inference into one persistent megakernel."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("mpk")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0"
