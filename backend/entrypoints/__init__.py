"""How kvtriton starts: offline generation, `kvtriton serve`, the tritonserver launcher."""
