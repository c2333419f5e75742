"""The GUI's user-facing error: a bad value or request, shown as its one-line message."""


class UserError(ValueError):
    pass
