"""Google FLEURS (downloaded by the user, read only)."""
