"""Teams and seats: a customer who pays for several seats (a subscription item's quantity of a
``SEAT_PRICE_IDS`` price) is a team's **owner**; the people it invites by email are its
**members**, who sign in with their own email and get the team's entitlement.

- :mod:`gateway.store.teams`: the store's team tables (members, invitations, seats);
- :mod:`.service`: :class:`~gateway.teams.service.Teams` — memberships in memory for the
  request path (which key an identity's lookup lives under, ``X-Gate-Team``/``X-Gate-Role``),
  invitations, removal, the seat count read from Stripe and what a lower count does;
- :mod:`.seats`: the seat change on the account page (Stripe's prorated preview, then the
  subscription item's new quantity);
- :mod:`.pages`: the account page's Team section, its forms and the invitation link;
- :mod:`.cli`: ``gateway team``.

The CLI imports :mod:`.cli` lazily (the parser stays light).
"""
