"""kvtriton.build."""
