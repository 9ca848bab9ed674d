"""llgbm-worlds."""
