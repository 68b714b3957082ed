"""The one exception type a user can cause; the CLI turns it into one line and exit code 1."""


class GgufmoeError(Exception):
    """A problem with the user's input or environment, explained in one line."""
