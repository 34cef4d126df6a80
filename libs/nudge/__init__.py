"""Nudge: the shared library of the triggered-messaging engine and its generated protos."""
