"""The one exception type for mistakes the user can fix."""


class UserError(Exception):
    """Bad input: the message is one line naming what is wrong and how to fix it."""
