"""Stripe-style form decoding and API errors for the Stripe test double.

Stripe's API takes ``application/x-www-form-urlencoded`` parameters with bracketed nesting:
``metadata[plan]=pro``, ``line_items[0][price]=price_x``, ``expand[0]=customer`` (what
stripe-python sends) and ``expand[]=customer`` (what curl users write). :func:`parse_form` turns
the flat pairs into nested dicts and lists; the ``param_*`` helpers read typed values out of them
and raise :class:`ApiError` (a Stripe-shaped 400) on bad input.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any
from urllib.parse import parse_qsl

from aiohttp import web

__all__ = [
    "REQUEST_ID",
    "ApiError",
    "Params",
    "missing",
    "missing_param",
    "one_of",
    "param_bool",
    "param_dict",
    "param_int",
    "param_list",
    "param_required",
    "param_str",
    "parse_form",
    "read_params",
]

Params = dict[str, Any]
REQUEST_ID = web.RequestKey("stripe_double_request_id", str)

_KEY_RE = re.compile(r"^([^\[\]]+)((?:\[[^\[\]]*\])*)$")
_PART_RE = re.compile(r"\[([^\[\]]*)\]")


class ApiError(Exception):
    """An error answered in Stripe's JSON error format."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type_: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.code = code
        self.param = param

    def body(self) -> dict[str, Any]:
        error: dict[str, Any] = {"type": self.type, "message": self.message}
        if self.code is not None:
            error["code"] = self.code
        if self.param is not None:
            error["param"] = self.param
        return {"error": error}


def missing(kind: str, object_id: str, *, param: str = "id", status: int = 404) -> ApiError:
    """Stripe's ``resource_missing`` error: 404 for ids in the URL, 400 for ids in parameters."""
    return ApiError(status, f"No such {kind}: '{object_id}'", code="resource_missing", param=param)


def missing_param(param: str) -> ApiError:
    """Stripe's ``parameter_missing`` error for a required parameter (its full bracketed path)."""
    return ApiError(400, f"Missing required param: {param}.", code="parameter_missing", param=param)


def _split_key(key: str) -> list[str]:
    match = _KEY_RE.match(key)
    if match is None:
        return [key]
    return [match.group(1), *_PART_RE.findall(match.group(2))]


def _listify(node: Any) -> Any:
    """Turn dicts whose keys are all indexes (``a[0]``, ``a[1]``) into lists, recursively."""
    if not isinstance(node, dict):
        return node
    converted = {key: _listify(value) for key, value in node.items()}
    if converted and all(key.isdigit() for key in converted):
        return [converted[key] for key in sorted(converted, key=int)]
    return converted


def parse_form(pairs: Iterable[tuple[str, str]]) -> Params:
    """Decode flat ``(key, value)`` pairs with bracket nesting into nested dicts and lists.

    ``a[]=x`` appends (becomes the next index). A key used both as a scalar and as a container
    (``a=1&a[b]=2``) is a 400, as on Stripe.
    """
    root: dict[str, Any] = {}
    for key, value in pairs:
        parts = _split_key(key)
        node = root
        for depth, part in enumerate(parts):
            name = str(len(node)) if part == "" else part
            if depth == len(parts) - 1:
                if isinstance(node.get(name), dict):
                    raise ApiError(
                        400, f"Invalid parameter: {key} mixes a value and a hash", param=key
                    )
                node[name] = value
                break
            child = node.setdefault(name, {})
            if not isinstance(child, dict):
                raise ApiError(400, f"Invalid parameter: {key} mixes a value and a hash", param=key)
            node = child
    result = _listify(root)
    assert isinstance(result, dict)
    return result


async def read_params(request: web.Request) -> Params:
    """A request's query string and form body, decoded into nested Stripe parameters."""
    pairs = list(request.query.items())
    if request.body_exists:
        pairs += parse_qsl(await request.text(), keep_blank_values=True)
    return parse_form(pairs)


def param_str(params: Params, name: str, default: str | None = None) -> str | None:
    value = params.get(name, default)
    if value is None or isinstance(value, str):
        return value
    raise ApiError(400, f"Invalid string: {name} must be a string", param=name)


def one_of(value: str, choices: Iterable[str], param: str, *, label: str | None = None) -> str:
    """``value`` if it is one of ``choices``; else Stripe's 400 naming ``param`` (the full
    parameter path) and, in the message, ``label`` (default: ``param``)."""
    allowed = tuple(choices)
    if value not in allowed:
        raise ApiError(
            400, f"Invalid {label or param}: must be one of {', '.join(allowed)}", param=param
        )
    return value


def param_required(params: Params, name: str) -> str:
    value = param_str(params, name)
    if not value:
        raise missing_param(name)
    return value


def param_bool(params: Params, name: str) -> bool | None:
    value = param_str(params, name)
    if value is None:
        return None
    if value in ("true", "false"):
        return value == "true"
    raise ApiError(400, f"Invalid boolean: {value}", param=name)


def param_int(params: Params, name: str, default: int | None = None) -> int | None:
    value = param_str(params, name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ApiError(400, f"Invalid integer: {value}", param=name) from None


def param_dict(params: Params, name: str) -> dict[str, Any] | None:
    """A hash parameter; ``name=`` (empty string) means "unset" and gives an empty dict."""
    value = params.get(name)
    if value is None:
        return None
    if value == "":
        return {}
    if isinstance(value, dict):
        return value
    raise ApiError(400, f"Invalid hash: {name} must be a hash", param=name)


def param_list(params: Params, name: str) -> list[Any]:
    value = params.get(name)
    if value is None:
        return []
    if isinstance(value, list):
        return value
    if isinstance(value, str):
        return [value]
    raise ApiError(400, f"Invalid array: {name} must be an array", param=name)
