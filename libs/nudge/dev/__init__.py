"""Development helpers: the embedded Postgres + nats-server stack for `nudge up` and tests."""
