"""Build a checkpoint into a ready-to-serve Triton model: ONNX step graph, optional INT8, TensorRT engine.

    kvtriton build <checkpoint> --precision fp32|fp16|bf16|int8|int4 --runtime onnxruntime|tensorrt
                   --out <repository> [--name NAME] [--group-size 32|64|128]
"""

from __future__ import annotations

import argparse
import sys

from kvtriton.build.model_builder import RUNTIMES, BuildConfig, build_model
from kvtriton.build.onnx_export import PRECISIONS

EXAMPLES = """examples:
  kvtriton build default --out my_repository --name llm_int4 --precision int4 --runtime onnxruntime
  kvtriton build ./Llama-3.2-1B-Instruct --out my_repository --precision fp16 --runtime tensorrt
  kvtriton serve --model-repository my_repository"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = BuildConfig(checkpoint="", out="")
    parser.add_argument("checkpoint", help="HF model folder, a .gguf file, or 'default' (SmolLM2-135M-Instruct)")
    parser.add_argument("--out", required=True, help="model repository folder to write <name>/ into")
    parser.add_argument("--name", default=defaults.name, help="Triton model name (default: %(default)s)")
    parser.add_argument("--precision", choices=list(PRECISIONS), default=defaults.precision,
                        help="weights/compute of the graph; int8 = weight-only, per-channel; int4 = weight-only, "
                             "group-wise (a GGUF's Q4_0/Q4_1/Q8_0 blocks as stored) (default: %(default)s)")
    parser.add_argument("--runtime", choices=RUNTIMES, default=defaults.runtime, help="default: %(default)s")
    parser.add_argument("--block-size", type=int, default=defaults.block_size,
                        help="KV block size baked into the graph (default: %(default)s)")
    parser.add_argument("--max-num-seqs", type=int, default=defaults.max_num_seqs,
                        help="largest decode batch (tensorrt profile, engine config) (default: %(default)s)")
    parser.add_argument("--max-num-batched-tokens", type=int, default=defaults.max_num_batched_tokens,
                        help="token budget per step = largest prefill chunk (default: %(default)s)")
    parser.add_argument("--max-model-len", type=int, default=defaults.max_model_len,
                        help="longest context, capped at the checkpoint's (default: %(default)s)")
    parser.add_argument("--num-kv-blocks", type=int, default=defaults.num_kv_blocks,
                        help="tensorrt: KV pool size in blocks, fixed in the engine (default: %(default)s)")
    parser.add_argument("--int8-activations", choices=["auto", "fp32", "fp16", "bf16"],
                        default=defaults.int8_activations,
                        help="int8/int4: activation and KV dtype; auto = fp16 for tensorrt, fp32 for onnxruntime")
    parser.add_argument("--group-size", type=int, choices=[32, 64, 128], default=defaults.group_size,
                        help="int4: inputs per scale and zero point (default: %(default)s)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing <out>/<name>")


def run(args: argparse.Namespace) -> int:
    try:
        cfg = BuildConfig(checkpoint=args.checkpoint, out=args.out, name=args.name, precision=args.precision,
                          runtime=args.runtime, block_size=args.block_size, max_num_seqs=args.max_num_seqs,
                          max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=args.max_model_len,
                          num_kv_blocks=args.num_kv_blocks, int8_activations=args.int8_activations,
                          group_size=args.group_size, overwrite=args.overwrite)
        build_model(cfg, say=lambda line: print(line, flush=True))
    except (ValueError, FileNotFoundError, FileExistsError, ImportError, RuntimeError) as exc:
        print(f"kvtriton build: error: {exc}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kvtriton build", description=__doc__, epilog=EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
