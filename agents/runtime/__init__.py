"""The DSPy runtime that pool workers and job runners share.

Programs, modules, signatures, JSON state, the runner, LMs (local model,
LiteLLM, labelled simulations), tools and scoring.
"""
