"""The one error type users see."""


class VqkitError(Exception):
    """A user-facing error: the CLI prints its message on one line and exits with status 1."""


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised like Ctrl-C (SIGINT) so that every writer cleans up the same way;
    ``signum`` says which (the command exits with 128 + signum)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum
