"""llgbm-flora."""
