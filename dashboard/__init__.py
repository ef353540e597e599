"""imgpipe: dashboard."""
