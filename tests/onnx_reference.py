"""Test helper: a half-precision step graph in onnxruntime beside the fp32 torch step on the same inputs."""

from __future__ import annotations

import torch

from kvtriton.backend.models.loader import load_model
from kvtriton.backend.runners.step_graph import INPUT_NAMES, StepGraph, example_inputs


def half_graph_vs_fp32(path, folder):
    """-> (onnxruntime logits of the fp16 graph at `path`, fp32 torch logits), as numpy arrays."""
    import onnxruntime as ort

    model = load_model(folder)
    inputs = example_inputs(model, batch=2, tokens=3, block_size=4)
    with torch.no_grad():
        expected = StepGraph(model)(*inputs)[0].numpy()
    feed = {n: (t.half() if t.is_floating_point() else t).numpy() for n, t in zip(INPUT_NAMES, inputs)}
    return ort.InferenceSession(str(path)).run(None, feed)[0], expected
