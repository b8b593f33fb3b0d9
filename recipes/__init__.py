"""Data-preparation recipes of speechbrain-meta (run from the repository root)."""
