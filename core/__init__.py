"""imgpipe: core."""
