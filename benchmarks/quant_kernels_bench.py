"""Weight-only matmul kernels on the CPU, at the default model's shapes: which one the int4/int8 layers use.

For each batch size M, the time of one decode step's matmuls: 30 layers' distinct weights (qkv 960x576,
o 576x576, gate_up 3072x576, down 576x1536) and the lm_head (49152x576), so that weights come from
memory as in a real step rather than from cache. Candidates:

  torch fp32 / bf16 dense         x @ W.T
  torch int8 per channel          torch._weight_int8pack_mm, bf16 activations (Int8Linear from float)
  kvtriton int4 g32 / g64 (GEMV)  kernels/cpu_int4_gemv.cpp, bf16 activations, where the CPU has AVX-512 BF16
                                  (Int4Linear's kernel there)
  torch int4 g32 / g64 (tinygemm) torch.ops.aten._weight_int4pack_mm_for_cpu, bf16 (Int4Linear's kernel on
                                  other CPUs); fp32 and fp16 activations are timed on one layer only (they
                                  are 10-50x slower)
  ... + Q8_0 lm_head (2 planes)   the GGUF Q8_0 lm_head as two int4 planes through the same kernel (Int8Linear
                                  from groups)
  onnxruntime MatMulNBits         4-bit g32 at accuracy level 0 (fp32 compute) and 4 (int8 activations);
                                  8-bit g32 (the Q8_0 lm_head) at level 4

  python benchmarks/quant_kernels_bench.py [--batch 1,32] [--rounds 7]

--device cuda: the GPU decode kernels at the 1B-class Llama's shapes instead (benchmarks/quant_kernels_gpu.py:
bf16 / fp8 / int4, every candidate tile, the tables to paste into the kernel modules):

  python benchmarks/quant_kernels_bench.py --device cuda [--rows 1,2,4,8,16,32,64] [--out tiles.json]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import numpy as np
import torch

from kvtriton.backend.models.int4 import (
    Int4Linear,
    gemv_serves,
    int4_mm_cpu,
    pack_for_tinygemm,
    quantize_groupwise,
    tinygemm_zero,
    unpack_nibbles,
)
from kvtriton.backend.models.int8 import Int8Linear, two_plane_pack
from kvtriton.backend.models.quantization import GroupQuantized

LAYERS = 30
LAYER_SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]  # (N, K) of qkv, o, gate_up, down
LM_HEAD = (49152, 576)


def timed(fn, rounds: int) -> float:
    """Median seconds of `fn` over `rounds` calls after one warm-up (a shared CPU is noisy)."""
    fn()
    samples = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def torch_candidates(weights: dict, m: int) -> dict:
    """name -> a function running the step's matmuls (layers, then lm_head) on (m, K) activations."""
    xs = {k: torch.randn(m, k) for _, k in LAYER_SHAPES}
    xb = {k: x.bfloat16() for k, x in xs.items()}

    def run(layer_fns, head_fn, inputs):
        def step():
            for (n, k), fns in layer_fns.items():
                for fn in fns:
                    fn(inputs[k])
            head_fn(inputs[576])
        return step

    dense32 = {s: [lambda x, w=w: x @ w.T for w in ws] for s, ws in weights["float"].items()}
    dense16 = {s: [lambda x, w=w.bfloat16(): x @ w.T for w in ws] for s, ws in weights["float"].items()}
    head = weights["head_float"]
    head16 = head.bfloat16()
    int8 = {s: [Int8Linear(*_per_channel(w), None) for w in ws] for s, ws in weights["float"].items()}
    int8_head = Int8Linear(*_per_channel(head), None)
    out = {
        "torch fp32 dense": run(dense32, lambda x: x @ head.T, xs),
        "torch bf16 dense": run(dense16, lambda x: x @ head16.T, xb),
        "torch int8 per channel": run({s: [l.matmul for l in ls] for s, ls in int8.items()}, int8_head.matmul, xs),
    }
    for g, layers in weights["int4"].items():
        for kernel, mm in int4_kernels(g).items():
            shapes = {s: [mm(layer) for layer in ls] for s, ls in layers.items()}
            out[f"{kernel} int4 g{g} (+ int4 lm_head)"] = run(shapes, mm(weights["head_int4"][g]), xs)
            out[f"{kernel} int4 g{g} + Q8_0 lm_head (2 planes)"] = run(shapes, mm(weights["head_q8"], planes=True), xs)
    return out


def int4_kernels(group_size: int) -> dict:
    """kernel name -> a function making, from an Int4Linear (or, planes=True, a group-wise Int8Linear), its matmul
    through that kernel: kvtriton's GEMV where it runs here, and PyTorch's tinygemm kernel."""
    def tinygemm(layer, planes=False):
        if planes:
            packed, scale_zeros = two_plane_pack(layer.qweight, layer.scale, pack=pack_for_tinygemm)
            return lambda x: int4_mm_cpu(torch.cat([x, x], dim=1), packed, group_size, scale_zeros, layer.out_features)
        packed, scale_zeros = tinygemm_operands(layer)
        return lambda x: int4_mm_cpu(x, packed, group_size, scale_zeros, layer.out_features)

    gemv_here = gemv_serves()  # then the layers' own matmul is the GEMV
    return {**({"kvtriton GEMV": lambda layer, planes=False: layer.matmul} if gemv_here else {}),
            "torch tinygemm": tinygemm}


def tinygemm_operands(layer: Int4Linear) -> tuple[torch.Tensor, torch.Tensor]:
    """An Int4Linear's numbers packed for PyTorch's kernel, whichever kernel the layer itself runs."""
    return pack_for_tinygemm(unpack_nibbles(layer.qweight), layer.scale,
                             tinygemm_zero(layer.scale, layer.zero_point, layer.offset))


def _per_channel(w):
    from kvtriton.backend.models.int8 import quantize_per_channel

    return quantize_per_channel(w)


def ort_candidates(weights: dict, m: int) -> dict:
    """The same step as one onnxruntime graph of MatMulNBits nodes, per accuracy level."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from kvtriton.backend.models.int4 import pack_nibbles

    def graph(level4: int, level8: int):
        nodes, inits, outputs = [], [], []
        layers = [(f"l{i}_{n}x{k}", q) for (n, k), qs in weights["int4"][32].items() for i, q in enumerate(qs)]
        layers.append(("lm_head", None))
        for name, layer in layers:
            if layer is None:  # the Q8_0 lm_head: 8-bit groups
                q = weights["head_q8"].group_quantized()
                b = (q.codes.to(torch.int16) + 128).to(torch.uint8).reshape(q.shape[0], -1, 32)
                zp = torch.full(q.scale.shape, 128, dtype=torch.uint8)
                bits, level = 8, level8
            else:
                q = layer.group_quantized()
                b = pack_nibbles(q.codes).reshape(q.shape[0], -1, 16)
                zp = pack_nibbles(q.zero_point if q.zero_point.shape[1] % 2 == 0 else
                                  torch.cat([q.zero_point, torch.zeros(q.shape[0], 1, dtype=torch.uint8)], 1))
                bits, level = 4, level4
            n, k = q.shape
            inits += [numpy_helper.from_array(b.numpy(), name + "_b"),
                      numpy_helper.from_array(q.scale.float().numpy(), name + "_s"),
                      numpy_helper.from_array(zp.numpy(), name + "_z")]
            nodes.append(helper.make_node("MatMulNBits", [f"x{k}", name + "_b", name + "_s", name + "_z"], [name],
                                          domain="com.microsoft", K=k, N=n, bits=bits, block_size=32,
                                          accuracy_level=level))
            outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, [m, n]))
        inputs = [helper.make_tensor_value_info(f"x{k}", TensorProto.FLOAT, [m, k]) for k in (576, 1536)]
        model = helper.make_model(helper.make_graph(nodes, "step", inputs, outputs, inits),
                                  opset_imports=[helper.make_opsetid("", 19), helper.make_opsetid("com.microsoft", 1)])
        session = ort.InferenceSession(model.SerializeToString())
        feed = {f"x{k}": np.random.randn(m, k).astype(np.float32) for k in (576, 1536)}
        return lambda: session.run(None, feed)

    return {"onnxruntime MatMulNBits 4-bit level 0, lm_head 8-bit level 4": graph(0, 4),
            "onnxruntime MatMulNBits 4-bit level 4, lm_head 8-bit level 4": graph(4, 4)}


def make_weights() -> dict:
    gen = torch.Generator().manual_seed(0)
    float_weights = {s: [torch.randn(s, generator=gen) * 0.02 for _ in range(LAYERS)] for s in LAYER_SHAPES}
    head = torch.randn(LM_HEAD, generator=gen) * 0.02
    int4 = {g: {s: [Int4Linear.from_group_quantized(quantize_groupwise(w, g)) for w in ws]
                for s, ws in float_weights.items()} for g in (32, 64)}
    codes = torch.randint(-127, 128, LM_HEAD, generator=gen, dtype=torch.int8)
    q8 = GroupQuantized(8, codes, (torch.rand(LM_HEAD[0], LM_HEAD[1] // 32, generator=gen) * 1e-3).half(), None,
                        None, 32, "Q8_0")
    return dict(float=float_weights, head_float=head, int4=int4, head_q8=Int8Linear.from_group_quantized(q8),
                head_int4={g: Int4Linear.from_group_quantized(quantize_groupwise(head, g)) for g in (32, 64)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", default="1,32", help="comma-separated batch sizes M")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--rows", default="1,2,4,8,16,32,64", help="cuda: decode batch sizes M")
    parser.add_argument("--out", help="cuda: write the measurements and the tiles as JSON here")
    parser.add_argument("--formats", default="bf16,fp8,int4", help="cuda: the weight formats to sweep (bf16's own "
                        "cuBLAS and fused kernels always run: every ratio is to them)")
    parser.add_argument("--shapes", default="qkv,o,gate_up,down,lm_head", help="cuda: the projections to sweep (a "
                        "sweep cut by a call's time limit goes on from where it stopped)")
    args = parser.parse_args()
    if args.device == "cuda":
        from quant_kernels_gpu import main as gpu_main  # benchmarks/ is on sys.path when run as a script

        return gpu_main(args)
    import onnxruntime

    print(f"# CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads; torch "
          f"{torch.__version__}, onnxruntime {onnxruntime.__version__}; {LAYERS} layers + lm_head, median of "
          f"{args.rounds}")
    weights = make_weights()
    for m in [int(b) for b in args.batch.split(",")]:
        results = {**torch_candidates(weights, m), **ort_candidates(weights, m)}
        times = {name: timed(fn, args.rounds) for name, fn in results.items()}
        base = times["torch fp32 dense"]
        print(f"M = {m}:")
        for name, seconds in times.items():
            print(f"  {name:58} {seconds * 1e3:8.2f} ms  {base / seconds:5.2f}x fp32")
    # The activation dtypes the tinygemm CPU kernel also takes, on one gate_up layer (M = 1).
    layer = weights["int4"][32][(3072, 576)][0]
    packed, scale_zeros = tinygemm_operands(layer)
    x = torch.randn(1, 576)
    for dtype in (torch.bfloat16, torch.float32, torch.float16):
        scales = scale_zeros.to(dtype)
        seconds = timed(lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(dtype), packed, 32, scales),
                        args.rounds * 5)
        print(f"tinygemm int4 g32, one 3072x576 layer, M = 1, {str(dtype).removeprefix('torch.'):8} activations: "
              f"{seconds * 1e6:8.0f} us")


if __name__ == "__main__":
    main()
