"""The Kafka plumbing every agent shares.

Consumed messages, outgoing records and error info (``messages``), the records
of the contract an agent writes (``records``), deadlines, offsets, the
publisher, retry, compacted-topic readers and the faust app of the stateful agents.
"""
