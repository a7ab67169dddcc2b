"""CSRF protection for the gate's state-changing forms: a signed double-submit token plus an
Origin check.

A random nonce lives in an HttpOnly, SameSite=Strict cookie; every form carries the nonce signed
with SESSION_SECRET (itsdangerous). A POST is accepted only when the signed form token matches
the cookie's nonce and, when the browser sends ``Origin``, it is the gate's own origin.
"""

import hmac
import secrets

from aiohttp import web
from itsdangerous import BadSignature, URLSafeSerializer

from gateway.settings import Settings

__all__ = ["CSRF", "CSRF_COOKIE"]

CSRF_COOKIE = "gate_csrf"


class CSRF:
    def __init__(self, settings: Settings, secret: str) -> None:
        self._signer = URLSafeSerializer(secret, salt="gate-csrf")
        self._binder = URLSafeSerializer(secret, salt="gate-checkout")
        self._secure = settings.secure_cookies

    def token(self, request: web.Request, response_cookies: dict[str, str]) -> str:
        """The form token for this browser; records a new nonce cookie in ``response_cookies``
        when the browser has none yet."""
        nonce = request.cookies.get(CSRF_COOKIE, "")
        if len(nonce) < 16:
            nonce = secrets.token_urlsafe(24)
            response_cookies[CSRF_COOKIE] = nonce
        return str(self._signer.dumps(nonce))

    def set_cookie(self, response: web.StreamResponse, nonce: str) -> None:
        response.set_cookie(
            CSRF_COOKIE, nonce, httponly=True, samesite="Strict", secure=self._secure, path="/"
        )

    def valid(self, request: web.Request, form_token: str, expected_origin: str) -> bool:
        origin = request.headers.get("Origin")
        if origin is not None and origin != expected_origin:
            return False
        nonce = request.cookies.get(CSRF_COOKIE, "")
        if not nonce or not form_token:
            return False
        try:
            signed = self._signer.loads(form_token)
        except BadSignature:
            return False
        return isinstance(signed, str) and hmac.compare_digest(signed, nonce)

    def bind(self, value: str) -> str:
        """A signed copy of ``value`` for a cookie (e.g. which Checkout this browser started)."""
        return str(self._binder.dumps(value))

    def unbind(self, token: str) -> str | None:
        """The value signed by :meth:`bind`, or None when missing or tampered."""
        if not token:
            return None
        try:
            value = self._binder.loads(token)
        except BadSignature:
            return None
        return value if isinstance(value, str) else None
