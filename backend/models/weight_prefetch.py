"""A decode step's weights asked into L2 on a side stream, a few kernels before the kernel that reads them.

A decode step's kernels run one after another, and only the large matmuls keep HBM busy: during attention over
short contexts, the norms, the small projections' ramps and the gaps between kernels it idles (an H100's bf16
64-row step streamed its weights at ~2.0 TB/s of 3.0). Here a side stream, forked from the step's stream at a
few points of each layer, hands weights to the copy engine (kernels/l2_prefetch.py), so that they stream during
those idle stretches and the matmul that reads them finds them in L2. A prefetch changes no value, and the side
stream joins the step's before the step ends, so a CUDA graph captures the fork and the join.

The plan says which weights to ask for at which point of a layer: "point:projection[+offset],...", points
`start` (before the layer's qkv), `attention` (before attention), `output` (after attention, before o_proj), and
in the fused small-batch step (models/llama_decode.py) also `mlp` (before gate_up) and `down`; projections
qkv_proj, o_proj, gate_up_proj, down_proj of this layer or the offset-th next. Each ask stops at
LIMIT_BYTES of a weight (a merged gate_up: half of it from each half, as its programs read both).
"""

from __future__ import annotations

import torch

PLAN = ""  # off; benchmarks/profile_decode.py --l2-ahead PLAN measures one
LIMIT_BYTES = 24 << 20
POINTS = ("start", "attention", "output", "mlp", "down")
PROJECTIONS = {"qkv_proj": "self_attn", "o_proj": "self_attn", "gate_up_proj": "mlp", "down_proj": "mlp"}
MAX_ROWS = 64  # decode steps; a prefill's matmuls keep HBM busy themselves


def parse(plan: str) -> dict[str, list[tuple[str, int]]]:
    """"start:o_proj,output:qkv_proj+1" -> {"start": [("o_proj", 0)], "output": [("qkv_proj", 1)]}."""
    asks: dict[str, list[tuple[str, int]]] = {}
    for item in filter(None, plan.split(",")):
        point, _, target = item.partition(":")
        name, _, offset = target.partition("+")
        if point not in POINTS or name not in PROJECTIONS:
            raise ValueError(f"L2 prefetch plan item {item!r}: want point:projection[+n], points {POINTS}, "
                             f"projections {tuple(PROJECTIONS)}")
        asks.setdefault(point, []).append((name, int(offset or 0)))
    return asks


def weight_bytes(module: torch.nn.Module) -> torch.Tensor | None:
    """The flat bytes a projection's kernels stream: a Linear's or fp8 layer's weight, an int4 layer's codes."""
    weight = getattr(module, "qweight", None)
    if weight is None:
        weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or not weight.is_contiguous():
        return None
    return weight.view(-1).view(torch.uint8)


class WeightPrefetch:
    """One decode step's asks: `at(point, layer_idx)` in the layer loop, `join()` before the step's output."""

    def __init__(self, layers, asks: dict[str, list[tuple[str, int]]], device: torch.device):
        self.layers, self.asks = layers, asks
        self.stream = side_stream(device)
        self.forked = False

    def at(self, point: str, layer_idx: int) -> None:
        regions = [r for name, offset in self.asks.get(point, ()) if layer_idx + offset < len(self.layers)
                   for r in self._regions(self.layers[layer_idx + offset], name)]
        if not regions:
            return
        from kvtriton.backend.kernels.l2_prefetch import prefetch_bytes  # Triton: CUDA installs only

        self.stream.wait_stream(torch.cuda.current_stream(self.stream.device))
        with torch.cuda.stream(self.stream):
            for region in regions:
                prefetch_bytes(region)
        self.forked = True

    def join(self) -> None:
        if self.forked:
            torch.cuda.current_stream(self.stream.device).wait_stream(self.stream)
            self.forked = False

    @staticmethod
    def _regions(layer, name: str) -> list[torch.Tensor]:
        flat = weight_bytes(getattr(getattr(layer, PROJECTIONS[name]), name))
        if flat is None:
            return []
        if name != "gate_up_proj":
            return [flat[:LIMIT_BYTES // 16 * 16]]
        half = flat.numel() // 2
        take = min(half, LIMIT_BYTES // 2) // 16 * 16
        return [flat[:take], flat[half:half + take]]


_streams: dict[torch.device, torch.cuda.Stream] = {}


def side_stream(device: torch.device) -> torch.cuda.Stream:
    if device not in _streams:
        _streams[device] = torch.cuda.Stream(device)
    return _streams[device]


def for_step(layers, x: torch.Tensor) -> WeightPrefetch | None:
    """The step's prefetcher, or None: no PLAN, not CUDA, or more rows than a decode step's."""
    if not PLAN or x.device.type != "cuda" or x.shape[0] > MAX_ROWS:
        return None
    return WeightPrefetch(layers, parse(PLAN), x.device)
