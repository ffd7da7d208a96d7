"""EngineConfig: every knob of the engine, typed and validated at the edge.

Unknown keys are errors (a misspelt `config.pbtxt` parameter must not be
silently ignored). Each optimisation has an off switch so that its effect
can be measured: prefix caching, chunked prefill, CUDA graphs.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any, Mapping

RUNNERS = ("torch", "onnxruntime", "tensorrt")
SPECULATIVE_METHODS = ("none", "ngram", "draft")
SELF_DRAFTS = {"self-int8": "int8", "self-int4": "int4"}  # speculative_model: the served model, quantized
MAX_SPECULATIVE_TOKENS = 16
DTYPES = ("auto", "float32", "float16", "bfloat16")
KV_CACHE_DTYPES = ("auto", "fp8")
SCHEDULING_POLICIES = ("fcfs", "priority")  # engine/request_queue.py
GENERATION_CONFIG_MODES = ("auto", "none")  # engine/generation_defaults.py, which config.py cannot import


@dataclass(frozen=True)
class EngineConfig:
    model: str = "default"  # HF folder, .gguf file, or "default" (SmolLM2-135M-Instruct in the cache)
    runner: str = "torch"
    device: str = "auto"  # "auto": cuda when available, else cpu (said in one log line)
    dtype: str = "auto"  # "auto": bfloat16 on CUDA, float32 on CPU
    dummy_weights: bool = False  # random weights from config.json, for benchmarks at real sizes
    # torch runner, weight-only: "int8" (per output channel) or "int4" (groups of quantization_group_size inputs,
    # asymmetric). A GGUF checkpoint's Q4_0/Q4_1/Q4_K/Q8_0 tensors load as stored under either (groups of 32).
    # "auto": int4 on the CPU for a GGUF checkpoint (its blocks; no tensor in fewer bits than the file's), else
    # none. "fp8": W8A8 e4m3 (CUDA compute capability 8.9+), weights quantized per channel at load, activations
    # per token.
    quantization: str = "none"
    quantization_group_size: int = 32  # int4: 32, 64 or 128
    # CPU, int4 / int8: inputs of at least this many rows (prefill chunks, larger decode batches) multiply by a
    # dense copy of each quantized weight (the weight-only kernels do not tile for many rows): fp32 on a CPU
    # without native bf16 (AVX2), the exact dequantized weight at 4 bytes a weight more; bf16 on one with
    # AVX-512 BF16 or AMX, 2 bytes more but rounded, so greedy output moves at near-ties (README
    # "Quantization"). 0: never. -1 (auto), the default: 48 where the copy is fp32; where it is bf16, decode
    # batches of 16 sequences and other steps of 256 tokens (one request's short prompt keeps the kernel).
    cpu_dense_min_rows: int = -1
    block_size: int = 16
    # torch runner: the KV pools' element type. "auto": the model's dtype. "fp8": e4m3 (CUDA compute capability
    # 8.9+, or the CPU), half a bf16 pool's bytes, so twice the tokens in the same memory and half the bytes each
    # decode step's attention reads; values are stored unscaled (saturated at +-448) and widened to the model's
    # dtype when read; README "FP8 KV cache" has the quality cost.
    kv_cache_dtype: str = "auto"
    kv_cache_memory_gb: float = 0.5  # CPU: the KV pool's size
    gpu_memory_utilization: float = 0.85  # CUDA: fraction of total memory the process may use (weights + KV)
    num_kv_blocks: int = 0  # > 0 overrides both budgets (tests use tiny pools)
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512  # token budget per step
    max_model_len: int = 0  # 0: the checkpoint's context length
    # Which waiting request is admitted next, and which running one is preempted when the KV pool runs dry
    # (engine/request_queue.py, vLLM's --scheduling-policy). "fcfs": arrival order, the newest preempted.
    # "priority": each request's `priority` (lower first, 0 by default), then arrival; the lowest-priority
    # running request is preempted, also to seat a waiting one of strictly higher priority.
    scheduling_policy: str = "fcfs"
    # "auto": requests that leave temperature, top_p, top_k, min_p or repetition_penalty unset get the checkpoint's
    # generation_config.json values, as vLLM serves them (engine/generation_defaults.py); "none": kvtriton's defaults
    generation_config: str = "auto"
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    enable_cuda_graphs: bool = True
    # CUDA graphs for prefill and mixed steps too, per (token, sequence) bucket up to this many tokens (0: such
    # steps run eagerly): an eager step costs the host about 1 ms a layer of PyTorch dispatch (README Benchmarks).
    # Past 512 tokens worth raising (up to max_num_batched_tokens) where the model is small enough that a step of
    # that many tokens takes the device less time than that dispatch (a 1B-class model up to a few thousand).
    max_prefill_graph_tokens: int = 512
    # Overlap the host's work for step N+1 with the device's step N (vLLM async scheduling, SGLang overlap
    # scheduler). On a CPU the forward pass runs on a thread of its own to overlap at all.
    enable_async_scheduling: bool = True
    # CPU: load the model on the thread that runs the forward passes, so the process has one OpenMP team,
    # which spin-waits between parallel regions. Faster on cores the server has to itself (one stream 2x);
    # fragile when other busy processes share them (README "CPU threads"), hence off by default.
    cpu_single_openmp_team: bool = False
    enable_torch_compile: bool = True  # CUDA decode graphs: torch.compile fuses the per-layer elementwise work
    # CPU: decode steps through torch.compile'd decoder layers, compiled at load (seconds from inductor's cache,
    # longer the first time): logits bit-identical, the default model's one-stream int4 step ~1.5x faster
    # (runners/cpu_compiled_decode.py). Off by default for the load time; on in the shipped config.pbtxt.
    cpu_compile_decode: bool = False
    # CUDA: Triton paged attention (decode at every batch and context, varlen prefill), and at batch <= 2 the
    # fused norm/matmul/SwiGLU kernels
    enable_triton_kernels: bool = True
    # Ranks the model is split over (Megatron: heads and MLP columns, vocabulary), one process each: NCCL
    # across cuda:0..N-1 on a GPU host, gloo on the CPU. Must divide the model's heads (checked at load).
    tensor_parallel_size: int = 1
    engine_path: str = ""  # onnxruntime / tensorrt runners: the built model file
    # Bounded work (0 = no bound). Past max_num_waiting queued requests a new one is refused at once
    # ("server busy"); a request not started within max_queue_time_s, or not finished within
    # max_request_time_s (a client that went away without cancelling), ends with an error.
    max_num_waiting: int = 256
    max_queue_time_s: float = 60.0
    max_request_time_s: float = 600.0
    # A longer prompt is refused before it is tokenized. 0: 64 bytes per token of max_model_len, more than
    # any real text takes (English averages about 4).
    max_prompt_bytes: int = 0
    # Speculative decoding (README "Speculative decoding"). "ngram": prompt lookup, proposals copied from the
    # prompt and output so far; "draft": a draft model proposes, speculative_model is a checkpoint folder that
    # shares the served model's tokenizer, or self-int8 / self-int4 (the served model's own weights, quantized).
    # The served model verifies the k proposals + 1 bonus token in one forward pass.
    speculative_method: str = "none"
    speculative_model: str = ""
    num_speculative_tokens: int = 0  # k per step; also the most a request may ask for (0 = off)
    prompt_lookup_min: int = 1  # ngram: the shortest suffix of the text that is looked up
    prompt_lookup_max: int = 4  # ngram: the longest (tried first)
    # Back-off: a step with at least this many running sequences does not speculate (the batch already keeps
    # the device busy, and verifying k extra tokens per sequence costs more than it saves). 0: never.
    speculative_disable_by_batch_size: int = 8
    # LoRA adapters served beside the model (vLLM's --lora-modules, Triton vllm_backend's multi-LoRA):
    # "name=path[,name=path...]", each a PEFT folder (adapter_config.json, adapter_model.safetensors), all read at
    # load and resident; a request picks one by its lora_name (models/lora.py). The torch runner on one device.
    lora_modules: str = ""

    def __post_init__(self) -> None:
        if self.runner not in RUNNERS:
            raise ValueError(f"runner must be one of {', '.join(RUNNERS)}, got {self.runner!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.quantization not in ("none", "auto", "int8", "int4", "fp8"):
            raise ValueError(f"quantization must be none, auto, int8, int4 or fp8, got {self.quantization!r}")
        if self.generation_config not in GENERATION_CONFIG_MODES:
            raise ValueError(f"generation_config must be one of {', '.join(GENERATION_CONFIG_MODES)}, got "
                             f"{self.generation_config!r}")
        if self.scheduling_policy not in SCHEDULING_POLICIES:
            raise ValueError(f"scheduling_policy must be one of {', '.join(SCHEDULING_POLICIES)}, got "
                             f"{self.scheduling_policy!r}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {self.kv_cache_dtype!r}")
        if self.kv_cache_dtype != "auto" and self.runner != "torch":
            raise ValueError(f"kv_cache_dtype {self.kv_cache_dtype} applies to the torch runner; a {self.runner} "
                             "graph keeps its KV cache in the precision it was built with")
        if self.quantization_group_size not in (32, 64, 128):
            raise ValueError(f"quantization_group_size must be 32, 64 or 128, got {self.quantization_group_size}")
        if self.quantization in ("int8", "int4", "fp8") and self.runner != "torch":
            raise ValueError(f"quantization applies to the torch runner; a {self.runner} graph keeps the precision it "
                             f"was built with (kvtriton build --precision {self.quantization})")
        if self.device not in ("auto", "cpu") and not self.device.startswith("cuda"):
            raise ValueError(f"device must be auto, cpu or cuda[:N], got {self.device!r}")
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.kv_cache_memory_gb <= 0:
            raise ValueError(f"kv_cache_memory_gb must be > 0, got {self.kv_cache_memory_gb}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.num_kv_blocks < 0 or self.max_model_len < 0 or self.max_prefill_graph_tokens < 0:
            raise ValueError("num_kv_blocks, max_model_len and max_prefill_graph_tokens must be >= 0")
        if self.cpu_dense_min_rows < -1:
            raise ValueError(f"cpu_dense_min_rows must be -1 (auto), 0 (never) or a row count, got "
                             f"{self.cpu_dense_min_rows}")
        for name in ("max_num_waiting", "max_queue_time_s", "max_request_time_s", "max_prompt_bytes"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 (0: no bound), got {getattr(self, name)}")
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        if self.tensor_parallel_size > 1:
            if self.runner != "torch":
                raise ValueError(f"tensor_parallel_size > 1 runs on the torch runner, not {self.runner}")
            if self.quantization in ("int8", "int4", "fp8"):
                raise ValueError(f"quantization {self.quantization} with tensor_parallel_size > 1 is not supported "
                                 "yet; use quantization none (or auto: none under tensor parallelism)")
            if self.device.startswith("cuda:"):
                raise ValueError(f"device {self.device!r} with tensor_parallel_size > 1: use cuda (rank r runs on "
                                 "cuda:r; CUDA_VISIBLE_DEVICES picks the GPUs)")

        self._validate_speculative()
        if self.lora_adapters and (self.runner != "torch" or self.tensor_parallel_size > 1):
            raise ValueError("lora_modules needs the torch runner on one device (tensor_parallel_size 1): exported "
                             "graphs and the tensor-parallel ranks hold no adapter weights")
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < 2:
            raise ValueError("max_num_batched_tokens too small to prefill without chunking")

    def _validate_speculative(self) -> None:
        method, k = self.speculative_method, self.num_speculative_tokens
        if method not in SPECULATIVE_METHODS:
            raise ValueError(f"speculative_method must be one of {', '.join(SPECULATIVE_METHODS)}, got {method!r}")
        if not 0 <= k <= MAX_SPECULATIVE_TOKENS:
            raise ValueError(f"num_speculative_tokens must be in [0, {MAX_SPECULATIVE_TOKENS}], got {k}")
        if self.speculative_disable_by_batch_size < 0:
            raise ValueError("speculative_disable_by_batch_size must be >= 0 (0: never back off)")
        if not 1 <= self.prompt_lookup_min <= self.prompt_lookup_max:
            raise ValueError(f"need 1 <= prompt_lookup_min <= prompt_lookup_max, got {self.prompt_lookup_min} and "
                             f"{self.prompt_lookup_max}")
        if method == "none":
            if self.speculative_model or k:
                raise ValueError("speculative_model and num_speculative_tokens need speculative_method ngram or "
                                 "draft")
            return
        if k < 1:
            raise ValueError(f"speculative_method {method} needs num_speculative_tokens >= 1")
        if self.runner != "torch":
            raise ValueError(f"speculative decoding runs on the torch runner; the {self.runner} step graph returns "
                             "one row of logits per sequence and cannot verify proposals")
        if method == "draft" and not self.speculative_model:
            raise ValueError("speculative_method draft needs speculative_model: a checkpoint folder, self-int8 or "
                             "self-int4")
        if method == "ngram" and self.speculative_model:
            raise ValueError("speculative_method ngram uses no speculative_model")
        if self.tensor_parallel_size > 1:
            raise ValueError(f"speculative_method {method} with tensor_parallel_size > 1 is not supported yet (the "
                             "ranks' step header carries one logits row per sequence, and the draft runner is not "
                             "split); use tensor_parallel_size 1")

    @property
    def lora_adapters(self) -> dict[str, str]:
        """lora_modules as name -> path, in the order given (adapter i + 1 is the i-th)."""
        return parse_lora_modules(self.lora_modules)

    @property
    def speculative_enabled(self) -> bool:
        return self.speculative_method != "none"

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> "EngineConfig":
        """From string-valued parameters (config.pbtxt, CLI): converts by field type; unknown keys are errors."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, raw in values.items():
            if key not in fields:
                raise ValueError(f"unknown engine parameter {key!r}; known: {', '.join(sorted(fields))}")
            kwargs[key] = convert_parameter(key, fields[key].type, raw)
        return cls(**kwargs)


def parse_lora_modules(text: str) -> dict[str, str]:
    """lora_modules ("name=path,name=path", blanks around each part ignored) as name -> path; ValueError naming
    the entry for a malformed one or a repeated name."""
    adapters: dict[str, str] = {}
    for entry in filter(None, (part.strip() for part in text.split(","))):
        name, sep, path = (part.strip() for part in entry.partition("="))
        if not sep or not path or not re.fullmatch(r"[A-Za-z0-9._-]+", name):
            raise ValueError(f"lora_modules entry {entry!r}: want name=path, the name of letters, digits, '.', '_' "
                             "or '-'")
        if name in adapters:
            raise ValueError(f"lora_modules names {name!r} twice")
        adapters[name] = path
    return adapters


def convert_parameter(key: str, type_name: Any, raw: Any) -> Any:
    """A string-valued parameter as its field's type (bool, int, float, str); the error names the key."""
    type_name = type_name if isinstance(type_name, str) else type_name.__name__
    try:
        if type_name == "bool":
            if isinstance(raw, bool):
                return raw
            text = str(raw).strip().lower()
            if text not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return text in ("true", "1", "yes")
        if type_name == "int":
            return int(str(raw).strip())
        if type_name == "float":
            return float(str(raw).strip())
        return str(raw)
    except ValueError:
        raise ValueError(f"parameter {key} must be a {type_name}, got {raw!r}") from None
