"""Model readers."""
