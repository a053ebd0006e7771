"""The one exception type for mistakes the user can fix, and the helper that quotes their input."""


class UserError(Exception):
    """Bad input: the message is one line naming what is wrong and how to fix it."""


def short(value: object, limit: int = 80) -> str:
    """repr(value), cut in the middle to about `limit` characters: an error line quotes the
    user's input to point at it, and a megabyte of it would bury the message."""
    text = repr(value)
    if len(text) <= limit:
        return text
    keep = (limit - 5) // 2
    return f"{text[:keep]} ... {text[-keep:]}"
