"""imgpipe: bench."""
