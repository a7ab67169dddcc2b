"""Local demo pieces: a demo upstream app and a Stripe test double."""

__all__: list[str] = []
