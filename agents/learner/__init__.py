"""The learning agent: turns telemetry into decayed statistics and publishes routing tables."""
