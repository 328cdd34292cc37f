"""Log lines that a request cannot forge: every value is escaped before it reaches a line."""

from __future__ import annotations

import logging
import re

# C0 and C1 controls, DEL, and the Unicode line and paragraph separators and bidirectional overrides that some
# log viewers honour: none of them may reach a log line raw.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
LINE_FORMAT = "%(asctime)s level=%(levelname)s logger=%(name)s %(message)s"


def escape(text: str) -> str:
    """*text* with every character that could end or disguise a log line written as ``\\xNN``/``\\uNNNN``."""
    if not _UNSAFE.search(text):
        return text
    return _UNSAFE.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


class EscapingFormatter(logging.Formatter):
    """Formats ``key=value`` lines whose message part is escaped, so a model name, path or header from a
    request can never start a fake line. A traceback, which the proxy writes itself, keeps its lines."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = escape(record.message)
        return super().formatMessage(record)


def configure(level: str) -> None:
    """Send every log record to stderr as escaped ``key=value`` lines at *level*."""
    handler = logging.StreamHandler()
    handler.setFormatter(EscapingFormatter(LINE_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
