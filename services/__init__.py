"""The four Nudge services."""
