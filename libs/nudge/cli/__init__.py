"""The `nudge` command: run the dev stack, migrate, manage keys, and talk to the services.

`nudge.cli.main` builds the argument parser and dispatches to one module per command group:
`up` (the dev stack supervisor), `admin` (database commands: migrate, keys, time), `api`
(gRPC clients: track, identify, campaigns, user, messages) and `health` (healthcheck).
"""
