"""The pool worker.

Executes the requests of one pool, streams answers, writes executions and
telemetry; breakers, retries and fallbacks live in ``faults``.
"""
