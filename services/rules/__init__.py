"""Rules: engagement-state projection and campaign evaluation."""
