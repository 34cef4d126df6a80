"""Test support: pytest fixtures for real Postgres and real NATS (`nudge.testing.fixtures`)."""
