"""Storage: atomic artifacts, the JSONL store, the cross-run reference cache and model files."""
