"""The base of every error a user can cause and fix.

The CLI prints these as one clear message (cause and fix) with exit code 2,
never as a traceback; anything else is a bug and keeps its traceback.
"""


class AvatarError(Exception):
    """A problem with the user's input or machine, explained in the message."""
