"""Errors a user can cause and fix; the CLI prints them as one line, without a traceback."""


class UserError(Exception):
    exit_code = 1

    def __init__(self, message: str, exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code
