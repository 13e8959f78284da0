"""The sessions agent: tombstones sessions whose TTL has passed (docs/sessions.md)."""
