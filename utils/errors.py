"""The one exception type for failures the user can fix."""


class UserError(Exception):
    """An expected failure: bad config, missing file, no network.

    The command-line entry points print its message as a single ``error:`` line
    and exit non-zero, without a traceback.
    """
