"""Live captions for Nextcloud Talk calls."""

__version__ = "0.1.0"
