"""The engine: request lifecycle, scheduling, KV block bookkeeping, sampling and output processing."""
