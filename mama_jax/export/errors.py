"""The one error type of export packages (its own file: every part of the package raises it)."""


class PackageError(ValueError):
    """An export package is missing a file or its parts disagree; the message names the path."""
