"""Errors the line scorer raises: each names the file or bundle and the problem, so an operator can act on it."""

from __future__ import annotations


class InspectorError(Exception):
    """Base class for every error the inspector raises on purpose."""


class ImageError(InspectorError):
    """One image could not be used; the rest of a batch goes on."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


class BundleError(InspectorError):
    """A bundle is missing, tampered with, or of a schema this inspector does not know."""
