"""Ingest: the public gRPC API that appends events to the store, and the store relay."""
