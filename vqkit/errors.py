"""The one error type users see, and how untrusted text is shown in what vqkit prints."""

SHOWN_LIMIT = 80  # characters of an untrusted string that a message repeats


class VqkitError(Exception):
    """A user-facing error: the CLI prints its message on one line and exits with status 1."""


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised like Ctrl-C (SIGINT) so that every writer cleans up the same way;
    ``signum`` says which (the command exits with 128 + signum)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def shown(value: object, limit: int | None = SHOWN_LIMIT) -> str:
    """``value`` made safe to print on one line of a terminal: every character that is not
    printable (ESC, newlines and other controls, bidi overrides, undecodable bytes) becomes its
    Python escape (``\\x1b``, ``\\n``), and the result is cut to ``limit`` characters with
    ``...`` (no cut when None). For strings that come from files, headers or file names (a
    model id, a manifest path, a config key) before they enter a message."""
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(value))
    if limit is None or len(text) <= limit:
        return text
    return text[: max(limit - 3, 0)] + "..."
