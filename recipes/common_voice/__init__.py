"""Mozilla Common Voice releases (downloaded by the user, read only)."""
