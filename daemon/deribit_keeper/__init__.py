"""deribit-keeper: one authenticated, Cancel-On-Disconnect-protected Deribit session per account."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("deribit-keeper")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
