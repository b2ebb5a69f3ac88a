"""Errors that reach a user: one clear line, never a traceback."""


class UserError(Exception):
    """A bad argument, file or answer the user can fix; printed as one line, exit status 2."""
