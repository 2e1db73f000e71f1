"""The one error type users see."""


class VqkitError(Exception):
    """A user-facing error: the CLI prints its message on one line and exits with status 1."""
