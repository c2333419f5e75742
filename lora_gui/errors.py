"""The GUI's errors: each a ValueError whose one-line message the page shows as it is."""


class UserError(ValueError):
    """A bad value or request."""


class PathError(ValueError):
    """A user path is outside the workspace (or otherwise refused); the message says why."""


class QueueError(ValueError):
    """A queue operation that cannot be done (unknown job, a running job moved, ...)."""


class CliError(UserError):
    """A CLI call failed; the message is its one-line error."""
