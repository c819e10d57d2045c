"""The one exception type that reaches the user as a single line instead of a traceback."""


class UserError(Exception):
    """Bad input or state that the user can fix; the CLI prints ``error: <message>`` and exits 2."""
