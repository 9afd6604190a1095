"""Errors a user can cause and fix; the CLI prints them as one line, without a traceback."""


class UserError(Exception):
    exit_code = 1

    def __init__(self, message: str, exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class UndeclaredAccess(RuntimeError):
    """A step touched a table or model role its declaration (etl/step.py) does not list."""


class UndeclaredRead(UndeclaredAccess):
    """A step queried a table that is in neither its `reads` nor its `writes`."""


class UndeclaredWrite(UndeclaredAccess):
    """A step committed to a table its `writes` does not list."""


class UndeclaredRole(UndeclaredAccess):
    """A step loaded a model role its `roles` does not list."""
