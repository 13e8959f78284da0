"""Example modules an operator deploys with DSPex workers (see docs/modules.md)."""
