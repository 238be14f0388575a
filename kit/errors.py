"""User-facing errors.

Raise `KitError` (or a subclass) for anything the user can fix: a bad file, a bad row, a bad option.
The CLI prints its message on one line (`one_line`) and exits with status 2; it never shows a
traceback for it. Messages quote user input through `clip`, cut to a readable length.
"""


class KitError(Exception):
    """An error caused by the user's input; the message names the file, row or field."""


class DataError(KitError):
    """Bad or missing input data (images, CSV rows, masks)."""


class ConfigError(KitError):
    """A bad configuration value or command-line option."""


def clip(value: object, limit: int = 100, *, bare: bool = False) -> str:
    """`value` quoted for a one-line message: its repr (control characters escaped), cut to about
    `limit` characters with the full length noted, so a 10 MB field never floods the terminal.
    `bare`: the text itself, unquoted, when it is that short and printable (an ID after "ID ");
    a value that is not text (a number, a list) is always shown bare, as `str` prints it.

    Every message that quotes user input (an ID, a CSV field, an option value) goes through here.
    """
    if not isinstance(value, str):
        value, bare = str(value), True
    text = value
    if len(text) <= limit:
        return text if bare and text.isprintable() and text.strip() == text and text else repr(text)
    return f"{text[:limit]!r}... ({len(text):,} characters)"


def one_line(message: str, limit: int = 2000) -> str:
    """`message` on one line (whitespace runs, newlines included, become one space), cut to `limit`."""
    text = " ".join(str(message).split())
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"
