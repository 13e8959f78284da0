"""Pipelines: a DAG of programs as data (``PipelineVersion`` records on the pipelines topic).

- ``refs``: the reference grammar every part shares (client validation, the router's
  check and the pipeline agent's scheduling);
- ``spec``: the frozen :class:`~dspex.streams.pipelines.spec.Pipeline` (also the
  builder) and its stages, to and from records;
- ``files``: YAML/JSON pipeline files to and from a ``Pipeline``;
- ``validate``: every problem of a pipeline against its programs' signatures
  (``graph``: the cycles it names);
- ``problems``: a problem with its path, and ``InvalidPipeline``.
"""
