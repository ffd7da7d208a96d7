"""Where the batch-1 decode step's time goes on CUDA: kernels per step and the top kernels by GPU time.

  python benchmarks/profile_decode.py --tokenizer DIR [--compile on|off]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine_bench import LLAMA_1B  # noqa: E402

from kvtriton.backend.config import EngineConfig  # noqa: E402
from kvtriton.backend.engine.llm_engine import LLMEngine  # noqa: E402
from kvtriton.backend.engine.sampling_params import SamplingParams  # noqa: E402
from kvtriton.backend.engine.sequence import Sequence  # noqa: E402
from kvtriton.backend.runners.step_input import prepare_step  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--compile", default="on", choices=["on", "off"])
    args = ap.parse_args()
    folder = Path(tempfile.mkdtemp()) / "llama-1b"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(LLAMA_1B))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path(args.tokenizer) / name, folder / name)
    engine = LLMEngine(EngineConfig(model=str(folder), device="cuda", dummy_weights=True, max_num_seqs=1,
                                    max_model_len=512, enable_torch_compile=args.compile == "on"))
    seq = Sequence("probe", list(range(1, 65)), SamplingParams())
    seq.num_computed_tokens = 63
    seq.block_ids = engine.block_manager.allocate_slots("probe", seq.token_ids, 0, 64)
    step = prepare_step([(seq, 1)], 16, engine.device)
    for _ in range(10):
        engine.runner.execute(step)
    torch.cuda.synchronize()
    steps = 20
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            engine.runner.execute(step)
        torch.cuda.synchronize()
    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    total_us = sum(e.device_time for e in events)
    print(f"compile {args.compile}: {len(events) / steps:.0f} kernels per step, {total_us / steps:.0f} us of kernel time "
          f"per step")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70))


if __name__ == "__main__":
    main()
