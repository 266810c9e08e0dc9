"""The one exception type users see.

Library code raises `SjeaError` for anything a user can fix (bad option, missing file, a store
from another model). The CLI prints its message as one line and exits with `exit_code`; Python
callers get an ordinary exception with the same message.
"""


class SjeaError(Exception):
    """A problem the user can fix; the message says what is wrong and how to fix it."""

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code
