"""The base of the double's handler groups (the ``/v1`` API, the hosted pages, the ``/_double``
controls): each serves one double and lists its routes, which the double's app adds in turn."""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    from gateway.demo.stripe_double.double import StripeDouble

__all__ = ["DoubleHandlers"]


@dataclass
class DoubleHandlers(abc.ABC):
    """Handlers over one double."""

    double: StripeDouble

    @abc.abstractmethod
    def routes(self) -> list[web.RouteDef]:
        """The handlers' routes, for the double's app."""
