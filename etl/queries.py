"""Read-only SQL for `recontext sql`: one query statement, nothing that writes."""

from __future__ import annotations

import re

from core.errors import UserError

QUERY_STARTS = {"SELECT", "WITH", "SHOW", "DESCRIBE", "DESC"}
# Every other word a Spark, Databricks, Delta or Sail statement can start with: such a statement
# is refused as not a query. A first word that is none of these starts no statement at all: the
# engine's parser reports it (a typo such as `SELEC` is a parse error, not a write).
OTHER_STATEMENTS = {"INSERT", "UPDATE", "DELETE", "MERGE", "DROP", "CREATE", "ALTER", "TRUNCATE", "REPLACE",
                    "GRANT", "REVOKE", "VACUUM", "OPTIMIZE", "RESTORE", "MSCK", "REPAIR", "LOAD", "CACHE",
                    "UNCACHE", "REFRESH", "CLEAR", "USE", "SET", "RESET", "ADD", "LIST", "ANALYZE", "COMMENT",
                    "EXPLAIN", "EXECUTE", "DECLARE", "CALL", "COPY", "CONVERT", "GENERATE", "FSCK", "CLONE",
                    "FROM", "VALUES", "TABLE", "BEGIN", "COMMIT", "ROLLBACK", "START", "LOCK", "UNLOCK", "IF",
                    "WHILE", "FOR", "LOOP", "REPEAT", "CASE", "EXPORT", "IMPORT", "SYNC", "UNDROP", "APPLY"}
# Words that write or change state anywhere in a statement (e.g. `WITH x AS (...) INSERT ...`).
WRITE_WORDS = {"INSERT", "UPDATE", "DELETE", "MERGE", "DROP", "CREATE", "ALTER", "TRUNCATE",
               "OVERWRITE", "REPLACE", "GRANT", "REVOKE", "VACUUM", "OPTIMIZE", "RESTORE", "MSCK",
               "LOAD", "CACHE", "UNCACHE", "REFRESH"}

_LEXEME = re.compile(
    r"""(?P<comment>--[^\n]*|/\*.*?\*/)
      | (?P<string>'(?:\\.|''|[^'\\])*'|"(?:\\.|""|[^"\\])*"|`(?:``|[^`])*`)
      | (?P<word>[A-Za-z_][A-Za-z_0-9]*)
      | (?P<semicolon>;)
      | (?P<other>\S)""",
    re.VERBOSE | re.DOTALL,
)


class WriteRefused(UserError):
    exit_code = 2


def check_read_only(query: str) -> str:
    """Return the query without a trailing ';', or raise WriteRefused saying why. A query that starts
    with no statement word at all (a typo) is returned: the engine reports its parse error."""
    tokens = [(m.lastgroup, m.group()) for m in _LEXEME.finditer(query) if m.lastgroup != "comment"]
    while tokens and tokens[-1][0] == "semicolon":
        tokens.pop()
    if not tokens:
        raise WriteRefused("empty query")
    if any(kind == "semicolon" for kind, _ in tokens):
        raise WriteRefused("refused: only one statement per call (found ';' between statements)")
    words = [(i, text.upper()) for i, (kind, text) in enumerate(tokens) if kind == "word"]
    first = next((w for _, w in words), "")
    if first not in QUERY_STARTS and (first in OTHER_STATEMENTS or tokens[0][0] != "word"):
        raise WriteRefused(
            f"refused: `recontext sql` is read-only and runs only {', '.join(sorted(QUERY_STARTS))}"
            f" statements, not {first or tokens[0][1]!r}; tables are written by the pipeline's jobs"
        )
    for i, word in words:
        calls_function = i + 1 < len(tokens) and tokens[i + 1][1] == "("
        if word in WRITE_WORDS and not calls_function:  # replace(...) is a string function
            raise WriteRefused(f"refused: {word} writes data; `recontext sql` is read-only")
    return query.strip().rstrip(";").strip()
