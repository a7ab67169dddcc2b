"""API keys: programmatic clients (scripts, notebooks, CI) use the paid app as their customer.

- :mod:`~gateway.apikeys.format`: the key on the wire (``gk_live_``/``gk_test_`` + 30 random
  base62 + a base62 CRC32 checksum), its SHA-256 and its display start;
- :mod:`~gateway.apikeys.config`: the settings' syntax (``API_KEY_RATE``, ``API_KEY_HEADER``);
- :mod:`~gateway.apikeys.keys`: :class:`~gateway.apikeys.keys.ApiKeys`, issuing, revoking,
  rolling, and resolving a request's key from a cache bounded to 1 s (the gate's hook);
- :mod:`~gateway.apikeys.pages`: the account page's "API keys" section and its forms;
- :mod:`~gateway.apikeys.cli`: ``gateway keys create|list|revoke``.

Rows live in ``api_keys`` (:mod:`gateway.store.api_keys`). A request with a key is decided by
:func:`gateway.gate.check` as a session is (the customer's entitlement, features, quotas),
never redirected, and never opens the gate's own pages.
"""
