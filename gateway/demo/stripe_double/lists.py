"""Stripe's list objects for the Stripe test double: a page of a list (``limit``,
``starting_after``, ``ending_before``, ``has_more``) and ``expand`` of ids into the objects
they name."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

from gateway.demo.stripe_double.form import ApiError, Params, param_int, param_str

__all__ = ["Obj", "expand", "list_object", "paginate"]

Obj = dict[str, Any]


def list_object(data: list[Obj], url: str, has_more: bool = False) -> Obj:
    return {"object": "list", "data": data, "has_more": has_more, "url": url}


def paginate(items: Sequence[Obj], params: Params, url: str) -> Obj:
    """A Stripe list page of ``items`` (already newest first) honouring ``limit``,
    ``starting_after`` and ``ending_before``."""
    limit = param_int(params, "limit", 10)
    assert limit is not None
    if not 1 <= limit <= 100:
        raise ApiError(
            400,
            "This value must be greater than or equal to 1 and less than or equal to 100.",
            param="limit",
        )
    ids = [item["id"] for item in items]
    after, before = param_str(params, "starting_after"), param_str(params, "ending_before")
    for cursor, name in ((after, "starting_after"), (before, "ending_before")):
        if cursor and cursor not in ids:
            raise ApiError(
                400, f"Invalid {name} id: '{cursor}'", code="resource_missing", param=name
            )
    if after:
        window = list(items[ids.index(after) + 1 :])
        page, has_more = window[:limit], len(window) > limit
    elif before:
        window = list(items[: ids.index(before)])
        page, has_more = window[-limit:], len(window) > limit
    else:
        page, has_more = list(items[:limit]), len(items) > limit
    return list_object([copy.deepcopy(item) for item in page], url, has_more)


def expand(obj: Any, path: list[str], resolve: Callable[[str], Obj | None]) -> None:
    """Replace the id at ``path`` (``customer``, ``data.subscription``,
    ``items.data.price.product``) in ``obj`` by the object it names, in place."""
    if not path:
        return
    if isinstance(obj, list):
        for element in obj:
            expand(element, path, resolve)
        return
    if not isinstance(obj, dict) or path[0] not in obj:
        return
    value = obj[path[0]]
    if isinstance(value, str):
        target = resolve(value)
        if target is not None:
            value = obj[path[0]] = copy.deepcopy(target)
    expand(value, path[1:], resolve)
