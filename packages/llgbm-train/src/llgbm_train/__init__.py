"""llgbm-train."""
