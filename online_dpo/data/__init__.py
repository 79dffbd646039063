"""Data: prompt datasets and offline preference pairs."""
