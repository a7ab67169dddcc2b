"""Rules per path: ``(pattern, value)`` pairs matched against request paths (pure, no I/O).

The one matcher of the rule tables that attach a requirement to paths (``FEATURE_RULES``, and
any later table of the same kind). Patterns are those of ``PUBLIC_PATHS``
(:class:`gateway.paths.PublicPaths`: ``/export`` exactly, ``/api/analysis/*`` a prefix), tried
in order, the first match wins; they match the *normalized* path (:func:`normalize_path`).

Unlike public paths they match the way the most lenient app routes, because a requirement must
hold for every spelling the app answers (Express 4, ASP.NET and IIS route ``/EXPORT`` and
``/export/`` to ``/export`` by default):

- **case-insensitively** (Unicode case folding after NFKC, so full-width letters count too);
- **with or without one trailing slash**: ``/export`` and ``/export/`` are one pattern and
  match both paths; a prefix ``/api/analysis/*`` also matches ``/api/analysis`` itself (an app
  that mounts a router there answers it) but not ``/api/analysisx``.

Matching more is the safe side for a rule that *requires* something; ``PUBLIC_PATHS`` (which
*waives* the gate) stays exact. When the raw path is ambiguous (``%2F``, dot segments: an
upstream may route it elsewhere than we normalize it, see :mod:`gateway.paths`), the raw form is
matched too and the first rule matching either form applies. Answers are remembered per raw
path (bounded): the tables run for every gated request.
"""

import unicodedata
from collections.abc import Iterable
from typing import Generic, TypeVar

from gateway.paths import PublicPaths, is_unambiguous, normalize_path

__all__ = ["MEMO_PATHS", "PathRules", "fold_path"]

T = TypeVar("T")

#: Distinct raw paths remembered by :meth:`PathRules.match` (then it starts over), each at
#: most :data:`MAX_MEMO_PATH` long.
MEMO_PATHS = 4096
MAX_MEMO_PATH = 512


def _fold_case(path: str) -> str:
    return path.lower() if path.isascii() else unicodedata.normalize("NFKC", path).casefold()


def _strip_slash(path: str) -> str:
    return path[:-1] if len(path) > 1 and path.endswith("/") else path


def fold_path(path: str) -> str:
    """``path`` as the rules compare it: case-folded, without one trailing slash (``/`` stays)."""
    return _strip_slash(_fold_case(path))


class PathRules(Generic[T]):
    """``(pattern, value)`` rules, first match wins (see the module docstring). A bad pattern
    raises :class:`ValueError` with the same message as ``PUBLIC_PATHS``."""

    __slots__ = ("_memo", "_rules", "values")

    def __init__(self, rules: Iterable[tuple[str, T]]) -> None:
        compiled: list[tuple[str, str | None, T]] = []
        for raw, value in rules:
            pattern = raw.strip()
            PublicPaths([pattern])  # the same pattern syntax, the same messages
            star = pattern.endswith("*")
            body = normalize_path(pattern[:-1] if star else pattern)
            if body is None:  # refused by PublicPaths already; kept for the type checker
                raise ValueError(f"public path {raw!r} is not a valid path")
            if star:
                # Prefix: the folded body as it is (``/api/`` keeps its slash: no ``/apix``),
                # and the body without that slash as an exact path too.
                key = _fold_case(body)
                compiled.append((key, _strip_slash(key), value))
            else:
                compiled.append((fold_path(body), None, value))
        self._rules = tuple(compiled)
        #: The rules' values, in order.
        self.values: tuple[T, ...] = tuple(v for _, _, v in compiled)
        self._memo: dict[str, T | None] = {}

    def __bool__(self) -> bool:
        return bool(self._rules)

    def _first(self, path: str) -> T | None:
        folded = fold_path(path)
        for key, bare, value in self._rules:
            if bare is None:
                if folded == key:
                    return value
            elif folded.startswith(key) or folded == bare:
                return value
        return None

    def match(self, normalized_path: str, raw_path: str | None = None) -> T | None:
        """The value of the first rule matching the path (``raw_path``: as sent, for the
        ambiguous case), or None."""
        key = normalized_path if raw_path is None else raw_path.partition("?")[0]
        try:
            return self._memo[key]
        except KeyError:
            pass
        found = self._first(normalized_path)
        if found is None and raw_path is not None and not is_unambiguous(key):
            found = self._first(key)
        if len(key) <= MAX_MEMO_PATH:
            if len(self._memo) >= MEMO_PATHS:
                self._memo.clear()
            self._memo[key] = found
        return found
