"""imgpipe: workers."""
