"""What a call to a worker can end in besides its result, whichever kind of worker it is (Ray actor or
local process): the worker died (its trial may be retried on a replacement), or the call raised (the
trial fails, the worker stays). Each carries its reason as one line."""

from __future__ import annotations

REASON_CHARS = 200


class WorkerDied(Exception):
    """The worker's process is gone; `node`: the node whose leaving killed it, when that is how it died."""

    def __init__(self, reason: str, node: str | None = None):
        super().__init__(reason)
        self.reason, self.node = reason, node


class CallFailed(Exception):
    """The call raised in the worker (the worker's own methods catch a bad candidate's errors; this is
    anything else)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def cut(text: str, limit: int = REASON_CHARS) -> str:
    """`text` up to `limit` characters, cut at a word boundary."""
    if len(text) <= limit:
        return text
    return text[:limit].rsplit(" ", 1)[0].rstrip(",;:") + " ..."
