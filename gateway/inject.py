"""Badge injection (``INJECT_BADGE=true``): one ``<script>`` tag inserted into the app's HTML
pages, so paying users see "Subscription · N days left · Manage billing" without the app
changing.

Only small, uncompressed ``text/html`` responses are rewritten (they are buffered for it);
everything else streams untouched.
"""

import html
import re

from multidict import CIMultiDictProxy

__all__ = ["MAX_INJECT_BYTES", "badge_tag", "inject", "should_inject"]

#: Pages larger than this stream through without a badge (buffering them is not worth it).
MAX_INJECT_BYTES = 2 * 1024 * 1024

_BODY_CLOSE = re.compile(rb"</body\s*>", re.IGNORECASE)
_HEAD_OPEN = re.compile(rb"<head(?:\s[^>]*)?>", re.IGNORECASE)


def badge_tag(prefix: str) -> bytes:
    """The ``<script>`` tag of the badge (built once at startup; the prefix is escaped). Not
    deferred: placed first in ``<head>`` it runs before the app's own scripts, so it sees the
    WebSockets they open (and their 4401/4402 closes); it draws itself once the page is
    parsed."""
    attr = html.escape(prefix, quote=True)
    return f'<script src="{attr}/static/badge.js" data-prefix="{attr}"></script>'.encode()


def should_inject(status: int, headers: CIMultiDictProxy[str]) -> bool:
    """Whether an upstream response is an HTML page we may rewrite."""
    if status != 200:
        return False
    if not headers.get("Content-Type", "").lower().startswith("text/html"):
        return False
    if headers.get("Content-Encoding", "identity").lower() != "identity":
        return False
    length = headers.get("Content-Length")
    return length is None or (length.isdigit() and int(length) <= MAX_INJECT_BYTES)


def inject(body: bytes, tag: bytes) -> bytes:
    """``body`` with ``tag`` right after the first ``<head>`` tag, else before the last
    ``</body>``, else appended."""
    head = _HEAD_OPEN.search(body)
    if head is not None:
        return body[: head.end()] + tag + body[head.end() :]
    last = None
    for last in _BODY_CLOSE.finditer(body):  # noqa: B007 - we want the last match
        pass
    if last is None:
        return body + tag
    return body[: last.start()] + tag + body[last.start() :]
