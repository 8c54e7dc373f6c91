"""Request schemas (requests: the one place a body is parsed) and response schemas (responses: the OpenAPI document's)."""
