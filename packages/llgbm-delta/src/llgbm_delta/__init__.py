"""llgbm-delta."""
