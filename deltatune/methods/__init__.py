"""Adapter methods, one file each; ``registry.METHOD_MODULES`` imports them on first use."""
