"""Shared test configuration: real Postgres and NATS fixtures come from nudge.testing.fixtures
(registered with `-p nudge.testing.fixtures` by the Makefile)."""
