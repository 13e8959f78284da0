"""The metrics agent.

Windowed aggregates of telemetry on the ``metrics`` topic, and a Prometheus exporter.
"""
