"""The pipeline agent: runs pipelines (DAGs of programs) as stage requests through the router."""
