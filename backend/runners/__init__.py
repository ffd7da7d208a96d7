"""Model runners: execute one engine step (packed tokens over the paged KV cache) and return logits."""
