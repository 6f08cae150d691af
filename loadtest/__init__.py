"""drope-server: loadtest (see README)."""
