"""The splitfed client SDK."""
