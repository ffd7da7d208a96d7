"""Pick the device, dtype and runner an EngineConfig asks for, saying what was chosen.

No silent fallbacks: where the user named a component (a CUDA device, a
runner) and it is missing, this stops with a one-line message; where "auto"
let us choose, the choice is logged in one line.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from kvtriton.backend.config import EngineConfig
from kvtriton.backend.models.dtypes import TORCH_DTYPES
from kvtriton.backend.models.model_config import ModelConfig

log = logging.getLogger("kvtriton")



def resolve_device_and_dtype(config: EngineConfig) -> tuple[torch.device, torch.dtype]:
    if config.device == "auto":
        if torch.cuda.is_available():
            device = torch.device("cuda")
        else:
            device = torch.device("cpu")
            log.info("no CUDA GPU found: running on the CPU")
    elif config.device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {config.device!r} was asked for but this torch sees no CUDA GPU")
        device = torch.device(config.device)
    else:
        device = torch.device("cpu")
    if config.dtype == "auto":
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    else:
        dtype = TORCH_DTYPES[config.dtype]
    return device, dtype


def create_runner(config: EngineConfig, model_config: ModelConfig, folder: Path, device: torch.device,
                  dtype: torch.dtype, max_model_len: int):
    if config.runner == "torch" and config.tensor_parallel_size > 1:
        from kvtriton.backend.runners.tensor_parallel_runner import TensorParallelRunner

        return TensorParallelRunner(config, model_config, str(folder), device, dtype, max_model_len)
    if config.runner == "torch":
        from kvtriton.backend.runners.torch_runner import TorchRunner

        return TorchRunner(config, model_config, str(folder), device, dtype, max_model_len)
    if config.runner == "onnxruntime":
        from kvtriton.backend.runners.onnx_runner import OnnxRunner

        return OnnxRunner(config, model_config, folder, device, dtype, max_model_len)
    if config.runner == "tensorrt":
        from kvtriton.backend.runners.tensorrt_runner import TensorRTRunner

        return TensorRTRunner(config, model_config, folder, device, dtype, max_model_len)
    raise NotImplementedError(f"runner {config.runner!r} is not available yet; use runner=torch")
