"""Usage quotas and Stripe Meters: count, enforce (exactly, across workers and replicas), report."""
