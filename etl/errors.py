"""Errors a user can cause and fix; the CLI prints them as one line, without a traceback."""


class UserError(Exception):
    exit_code = 1
