"""imgpipe: imgpipe."""
