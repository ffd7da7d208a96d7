"""Attention over the paged KV cache: metadata, the pools, and its implementations."""
