"""The DSPex agent processes, one subpackage each, over two shared layers.

- ``router/``, ``worker/``, ``learner/``, ``metrics/``, ``jobs/``: one process each
  (``python -m dspex.agents router|worker|learner|metrics|jobs``);
- ``runtime/``: the DSPy runtime that workers and job runners share;
- ``plumbing/``: the Kafka side every process shares.

A process's subpackage never imports another's; what two share lives below both.
Needs the ``server`` extra (DSPy, faust, LiteLLM, the local model).
"""
