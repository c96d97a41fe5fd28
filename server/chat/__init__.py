"""Chat formats: the sandboxed template renderer, tool-call and reasoning families."""
