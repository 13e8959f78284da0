"""The router agent: validates each request, picks pool and variant, answers cache hits, retries."""
