"""Base of the errors that mean "the user must change something".

The CLI shows these as one line without a traceback; every other exception is a bug and
keeps its traceback.
"""


class UserError(Exception):
    """Bad input, params or environment; the message says what to do."""
