"""Dispatch: consent, caps, rendering and delivery of send requests over channels."""
