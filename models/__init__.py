"""Partitioning of Hugging Face causal LMs into head, body and tail."""
