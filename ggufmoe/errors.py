"""The exceptions a user can cause; the CLI turns each into one line and its exit code."""


class GgufmoeError(Exception):
    """A problem with the user's input or environment, explained in one line."""

    label = "error"
    exit_code = 1


class Interrupted(GgufmoeError):
    """Ctrl-C or SIGTERM; the message says what was kept and how to continue."""

    label = "interrupted"
    exit_code = 130


class Resumable(GgufmoeError):
    """An error that leaves the work done so far for ``--resume`` (a Ray cluster gone mid-run)."""


def one_line(e: BaseException | str) -> str:
    """An exception's message (or a message) on one line (library messages may span several), or its type's name."""
    return " ".join(str(e).split()) or type(e).__name__
