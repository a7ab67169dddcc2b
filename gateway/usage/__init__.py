"""Usage quotas and Stripe Meters: count, enforce (exactly, across workers and replicas), report.

- :mod:`~gateway.usage.config`: ``USAGE_RULES``, ``USAGE_METERS``, ``PRICE_QUOTAS``,
  ``FREE_QUOTAS`` parsed;
- :mod:`~gateway.usage.service`: the process's :class:`~gateway.usage.service.Usage` (meter,
  period and quota of a request; the app's reports; the flush and reporter loops);
- :mod:`~gateway.usage.counters`: admission from store reservations, the flush;
- :mod:`~gateway.usage.reporter`: the outbox sender (meter events to Stripe);
- :mod:`~gateway.usage.hook`: the request path's calls and the answers past a quota;
- :mod:`~gateway.usage.endpoint`: ``POST GATE_PREFIX/usage``;
- :mod:`~gateway.usage.views`, :mod:`~gateway.usage.admin`: what people and operators read.

The SQL is :mod:`gateway.store.usage`.
"""
