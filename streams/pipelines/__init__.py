"""Pipelines: a DAG of programs as data (``PipelineVersion`` records on the pipelines topic).

``refs`` is the reference grammar every part shares (client validation, the router's
check and the pipeline agent's scheduling).
"""
