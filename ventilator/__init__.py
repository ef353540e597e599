"""imgpipe: ventilator."""
