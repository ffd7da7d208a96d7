"""kvtriton.client."""
