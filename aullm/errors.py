"""The one exception type that means "the user gave us something wrong".

The CLI turns it into exit code 2 and a single line; anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations


class UserInputError(Exception):
    """Bad input: a path, a file, a field or a value. The message is one line that
    names what is wrong and what is allowed."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()))  # always one line
