"""Persistence: per-account JSON files."""
