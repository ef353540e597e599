"""imgpipe: sink."""
