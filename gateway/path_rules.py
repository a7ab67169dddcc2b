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
  that mounts a router there answers it) but not ``/api/analysisx``;
- **with or without ``;`` path parameters** in any segment: Servlet containers (Tomcat, Jetty,
  Undertow, so Spring) route ``/export;jsessionid=1`` and ``/api;x/analysis/run`` as
  ``/export`` and ``/api/analysis/run``;
- **with or without a format suffix** on the last segment: Rails routes ``/export.json`` to
  ``/export`` by default (``(.:format)``), Spring MVC before 5.3 too; so ``/export`` (and the
  bare form of a prefix) also matches ``/export.<anything without a slash>``.

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


def _without_parameters(path: str) -> str:
    """Each segment without its ``;`` parameters (``/a;x/b;y=1`` → ``/a/b``)."""
    return "/".join(segment.partition(";")[0] for segment in path.split("/"))


def _with_suffix(folded: str, exact: str) -> bool:
    """``folded`` is ``exact`` plus a format suffix (``/export.json`` for ``/export``)."""
    return (
        len(folded) > len(exact) + 1
        and folded.startswith(exact)
        and folded[len(exact)] == "."
        and exact != "/"
        and "/" not in folded[len(exact) :]
    )


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

    def _first(self, *paths: str) -> T | None:
        """The value of the first rule (in order) that matches any of ``paths`` in any of the
        spellings an app may route them as."""
        forms: list[str] = []
        for path in paths:
            folded = fold_path(path)
            forms.append(folded)
            if ";" in folded:  # the path as a Servlet container routes it
                forms.append(fold_path(_without_parameters(folded)))
        for key, bare, value in self._rules:
            for folded in forms:
                if bare is None:
                    if folded == key or _with_suffix(folded, key):
                        return value
                elif folded.startswith(key) or folded == bare or _with_suffix(folded, bare):
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
        if raw_path is not None and not is_unambiguous(key):
            found = self._first(normalized_path, key)
        else:
            found = self._first(normalized_path)
        if len(key) <= MAX_MEMO_PATH:
            if len(self._memo) >= MEMO_PATHS:
                self._memo.clear()
            self._memo[key] = found
        return found
