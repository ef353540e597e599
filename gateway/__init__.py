"""imgpipe: gateway."""
