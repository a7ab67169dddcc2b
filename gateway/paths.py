"""Request paths: normalization, public-path matching and safe redirect targets (pure, no I/O).

Why normalize: public paths (``PUBLIC_PATHS``) bypass the gate, so ``/static/../api`` or
``/static%2f..%2fapi`` must not be taken for ``/static/…``. :func:`normalize_path` decodes the
path the way the most lenient server would (percent-decoding until stable, ``\\`` as ``/``,
duplicate slashes collapsed, dot segments resolved) and refuses what no honest client sends
(control characters, invalid UTF-8, a ``#``, ``..;`` path-parameter tricks, full-width look-alikes
of ``/`` and ``.``). The normalized path decides; what is forwarded upstream is the proxy's choice.

One gap remains when the upstream interprets a path *less* than we do: ``/api/..%2fstatic/x``
normalizes to ``/static/x``, but an upstream that keeps ``%2F`` (or does not resolve ``..``)
routes it under ``/api``. :meth:`PublicPaths.matches` therefore takes the raw path too and only
lets a path through as public when the raw form is unambiguous (no dot segments, ``//``, ``\\``,
``%2F``/``%5C``/``%2E``/``%25``). Honest clients never send those: browsers resolve dot segments
themselves. An ambiguous path is simply gated like any other.

:func:`safe_next` keeps ``next=`` redirect targets same-origin (open-redirect defence).
"""

import re
import unicodedata
from collections.abc import Iterable
from urllib.parse import unquote, unquote_to_bytes

__all__ = ["PublicPaths", "is_unambiguous", "normalize_path", "safe_next"]

#: Percent-decoding rounds before giving up (``%25252e`` needs three).
_MAX_DECODE_ROUNDS = 8
#: Longest accepted ``next`` value.
MAX_NEXT_LENGTH = 2048
#: :meth:`PublicPaths.classify` remembers up to this many distinct paths (then starts over),
#: each at most this long. A plain dict, not ``functools.lru_cache``: it runs for every proxied
#: request (benchmarked), must not keep over-long paths, and LRU bookkeeping buys nothing here.
MEMO_PATHS = 4096
MAX_MEMO_PATH = 512

# C0 and C1 control characters and DEL.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
# In a raw ``next``: controls, any whitespace (browsers strip tabs/newlines, which can turn
# ``/\t/x`` into ``//x``), backslashes (``/\x`` is ``//x`` to browsers) and non-ASCII.
_NEXT_BAD_RAW = re.compile(r"[\s\x00-\x1f\x7f-\x9f\\]|[^\x00-\x7f]")
# In a decoded ``next``: the same minus spaces and non-ASCII (``/a%20b`` and ``/caf%C3%A9`` are
# fine).
_NEXT_BAD_DECODED = re.compile(r"[\x00-\x1f\x7f-\x9f\\\t\n\r\f\v]")
_DOT_SEGMENTS = (".", "..")


# --------------------------------------------------------------------------- normalize


def normalize_path(raw_path: str) -> str | None:
    """The normalized form of ``request.raw_path`` (query stripped), or None for a malformed
    path (the caller answers 400). The result always starts with ``/``.

    A trailing slash is kept (``/static/`` stays ``/static/``; ``/a/b/..`` gives ``/a/``).
    """
    q = raw_path.find("?")
    path = raw_path if q < 0 else raw_path[:q]
    # Fast path: plain ASCII with nothing to decode or resolve (almost every request).
    if (
        path[:1] == "/"
        and "%" not in path
        and "//" not in path
        and "/." not in path
        and "\\" not in path
        and "#" not in path
        and path.isascii()
        and path.isprintable()
    ):
        return path
    return _normalize_slow(path)


def _normalize_slow(path: str) -> str | None:
    if "#" in path:  # never sent by browsers; servers disagree on its meaning
        return None
    try:
        data = path.encode("utf-8")  # aiohttp keeps undecodable bytes as lone surrogates
    except UnicodeEncodeError:
        return None
    for _ in range(_MAX_DECODE_ROUNDS):
        if b"%" not in data:
            break
        decoded = unquote_to_bytes(data)
        if decoded == data:
            break
        data = decoded
    else:
        if unquote_to_bytes(data) != data:
            return None  # still encoded after many rounds: nobody honest does that
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if _CONTROL.search(text) or "#" in text:
        return None
    text = text.replace("\\", "/")
    if text[:1] != "/":
        return None
    parts = text.split("/")[1:]
    out: list[str] = []
    for seg in parts:
        if seg == "" or seg == ".":
            continue
        if seg == "..":
            if out:
                out.pop()
            continue
        if not _segment_ok(seg):
            return None
        out.append(seg)
    result = "/" + "/".join(out)
    if out and parts[-1] in ("", ".", ".."):
        result += "/"
    return result


def _segment_ok(seg: str) -> bool:
    """Refuse segments other servers read as dot segments or separators."""
    if ";" in seg and seg.split(";", 1)[0] in _DOT_SEGMENTS:
        return False  # /static/..;/api is /api to Tomcat and friends
    if not seg.isascii():
        folded = unicodedata.normalize("NFKC", seg)  # full-width dots/solidus fold to ../
        if "/" in folded or "\\" in folded or folded.split(";", 1)[0] in _DOT_SEGMENTS:
            return False
    return True


def _unambiguous(raw_path: str) -> bool:
    """True when every server reads ``raw_path`` the same way we do (see the docstring)."""
    q = raw_path.find("?")
    path = raw_path if q < 0 else raw_path[:q]
    if "//" in path or "\\" in path:
        return False
    if "%" in path:
        low = path.lower()
        if "%2f" in low or "%5c" in low or "%2e" in low or "%25" in low:
            return False
    if "/." in path:
        for seg in path.split("/"):
            if seg.split(";", 1)[0] in _DOT_SEGMENTS:
                return False
    return True


#: Whether every server reads a raw path the way :func:`normalize_path` does (public name).
is_unambiguous = _unambiguous


# --------------------------------------------------------------------------- public paths


class PublicPaths:
    """``PUBLIC_PATHS`` patterns: ``/favicon.ico`` matches exactly; a trailing ``*`` matches a
    prefix, so ``/static/*`` matches ``/static/`` and everything below it but not ``/static``
    itself (nor ``/static-private``). ``/*`` makes everything public.

    Patterns are normalized like request paths; a pattern not starting with ``/`` or with a
    ``*`` elsewhere than at the end raises :class:`ValueError`.
    """

    __slots__ = ("_exact", "_memo", "_prefixes")

    def __init__(self, patterns: Iterable[str]) -> None:
        exact: set[str] = set()
        prefixes: list[str] = []
        for raw in patterns:
            pattern = raw.strip()
            if not pattern:
                continue
            star = pattern.endswith("*")
            body = pattern[:-1] if star else pattern
            if not body.startswith("/") or "*" in body:
                raise ValueError(
                    f"public path {raw!r}: expected /exact/path or /prefix/* (a trailing * only)"
                )
            normalized = normalize_path(body)
            if normalized is None:
                raise ValueError(f"public path {raw!r} is not a valid path")
            if star:
                prefixes.append(normalized)
            else:
                exact.add(normalized)
        self._exact = frozenset(exact)
        self._prefixes = tuple(prefixes)
        self._memo: dict[str, tuple[str | None, bool]] = {}

    def __bool__(self) -> bool:
        return bool(self._exact or self._prefixes)

    def __repr__(self) -> str:
        patterns = sorted(self._exact) + [p + "*" for p in self._prefixes]
        return f"PublicPaths({patterns!r})"

    def matches(self, normalized_path: str, raw_path: str | None = None) -> bool:
        """Whether ``normalized_path`` (from :func:`normalize_path`) is public.

        Pass ``raw_path`` (``request.raw_path``) too: then a path whose raw form is ambiguous
        (``/api/..%2fstatic/x``) is not public even though it normalizes under a public prefix.
        """
        if normalized_path in self._exact or normalized_path.startswith(self._prefixes):
            return raw_path is None or _unambiguous(raw_path)
        return False

    def classify(self, raw_path: str) -> tuple[str | None, bool]:
        """``(normalize_path(raw_path), matches(that, raw_path))`` in one call, the public
        flag False for a malformed path. Both depend on the path part only (not the query),
        which is remembered per distinct path (bounded; for the gate's per-request check)."""
        q = raw_path.find("?")
        path = raw_path if q < 0 else raw_path[:q]
        hit = self._memo.get(path)
        if hit is None:
            normalized = normalize_path(path)
            hit = (normalized, normalized is not None and self.matches(normalized, path))
            if len(path) <= MAX_MEMO_PATH:
                if len(self._memo) >= MEMO_PATHS:
                    self._memo.clear()
                self._memo[path] = hit
        return hit


# --------------------------------------------------------------------------- next


def safe_next(value: str | None, default: str = "/") -> str:
    """``value`` if it is a same-origin relative path (``/app?x=1#f``), else ``default``.

    Refused: anything not starting with exactly one ``/`` (``//x``, ``/\\x``, ``https://x``,
    ``javascript:…``), whitespace or control characters anywhere (browsers drop tabs and
    newlines: ``/\\t/x`` would become ``//x``), backslashes, non-ASCII (we always send it
    percent-encoded), dot segments (``/.//x`` resolves to the path ``//x``), values over 2 KiB,
    and all of these again in every percent-decoded form (``/%2F/x``, ``/%252F%252Fx``,
    ``/%5Cx``).
    """
    if not value or len(value) > MAX_NEXT_LENGTH:
        return default
    if _NEXT_BAD_RAW.search(value) or not _next_shape_ok(value):
        return default
    decoded = value
    for _ in range(_MAX_DECODE_ROUNDS):
        if "%" not in decoded:
            return value
        step = unquote(decoded)
        if step == decoded:
            return value
        decoded = step
        if _NEXT_BAD_DECODED.search(decoded) or not _next_shape_ok(decoded):
            return default
        if not decoded.isascii():
            folded = unicodedata.normalize("NFKC", decoded)
            if "\\" in folded or not _next_shape_ok(folded):
                return default
    return default  # still encoded after many rounds


def _next_shape_ok(value: str) -> bool:
    if value[:1] != "/" or value[1:2] in ("/", "\\"):
        return False
    if "javascript:" in value.lower():
        return False
    end = len(value)
    for sep in "?#":
        i = value.find(sep)
        if 0 <= i < end:
            end = i
    return all(seg not in _DOT_SEGMENTS for seg in value[:end].split("/"))
