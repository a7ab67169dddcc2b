"""The trusted identity header (``IDENTITY_HEADER``) and its precedence over the session
cookie, written once.

An auth proxy in front of the gate (oauth2-proxy, …) names the user in a header. It is believed
only from a peer in ``TRUSTED_PROXIES``; when it is believed it wins over the gate's own
session cookie. :func:`gateway.identity.identify` reads identities in that order, and
:func:`gateway.gate.check` skips its per-cookie verdicts when the header is present, both
through :func:`trusted_identity_header`.
"""

from collections.abc import Mapping

from gateway.settings import Settings

__all__ = ["trusted_identity_header"]


def trusted_identity_header(
    headers: Mapping[str, str], settings: Settings, peer_trusted: bool
) -> str | None:
    """The raw value of ``IDENTITY_HEADER`` when it counts (configured, sent by a trusted
    peer, present), else None. Not None means: it comes before the session cookie."""
    name = settings.identity_header
    if not name or not peer_trusted:
        return None
    return headers.get(name)
