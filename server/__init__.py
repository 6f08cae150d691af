"""drope-server: server (see README)."""
