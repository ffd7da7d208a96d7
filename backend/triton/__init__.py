"""The Triton Python-backend adapter: request parsing, response sink, metrics, cancellation."""
