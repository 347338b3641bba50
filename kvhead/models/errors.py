"""The one exception model provisioning raises.

Every failure a user can cause or fix (a typo in a name, a missing file, a corrupt download, a full
disk, an unreachable package index) becomes a ``ModelError`` with a one-line message, so the CLI
can print it and exit 2 instead of showing a traceback.
"""


class ModelError(RuntimeError):
    """A model could not be found, fetched, converted or verified; the message says why."""
