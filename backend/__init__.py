"""kvtriton.backend."""
