"""Readers for the built-in datasets; each module registers its names."""
