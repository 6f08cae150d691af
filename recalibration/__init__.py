"""drope-server: recalibration (see README)."""
