"""The job runner: optimizer jobs (datasets, specs, compile, transactional publication)."""
