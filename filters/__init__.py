"""imgpipe: filters."""
