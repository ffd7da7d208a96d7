"""What the layer tests on CUDA graphs share: a layer's call captured once and replayed on new input."""

from __future__ import annotations

import torch


def replayed_on_new_input(layer, x: torch.Tensor) -> torch.Tensor:
    """layer(x) captured in a CUDA graph, then replayed after x is refilled with new random values: the
    output the replay wrote, to compare with a reference on x's new values. A call before the capture
    compiles and allocates what the layer needs, which a capture must not do."""
    layer(x)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = layer(x)
    x.copy_(torch.randn_like(x))
    graph.replay()
    return out
