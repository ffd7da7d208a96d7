"""Multi-LoRA serving on a tiny random Llama (CPU, fp32): adapters read from PEFT folders, each request's output
equal to HF's with that adapter merged into the weights, adapters and the base model mixed in one batch, prefix
caching kept apart per adapter, and every refusal in one clear line."""

import json
import time

import pytest
import torch

from kvtriton.backend.config import EngineConfig, parse_lora_modules
from kvtriton.backend.engine.block_manager import BlockManager
from kvtriton.backend.engine.sampling_params import SamplingParams
from kvtriton.backend.models.lora import load_adapter
from kvtriton.backend.models.model_config import ModelConfig

from tests.lora_adapters import ALL_TARGETS, hf_greedy, make_adapter, merged_hf_model
from tests.tiny_model import make_tiny_engine

pytest.importorskip("transformers")

MAX_TOKENS = 10
PROMPTS = [[5, 17, 33, 2, 9, 101, 7, 60, 61], [44, 3, 250, 12], list(range(20, 47))]


def greedy(lora_name=None, **keys) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, lora_name=lora_name, **keys)


@pytest.fixture(scope="module")
def adapters(tiny_folder, tmp_path_factory):
    """Two adapters of the tiny model: v, o and up at rank 4 (parts of the fused qkv and gate_up left zero), and
    every projection at rank 8 under rsLoRA."""
    root = tmp_path_factory.mktemp("lora")
    return {
        "vou": make_adapter(root / "vou", tiny_folder, targets=("v_proj", "o_proj", "up_proj"), scale=2, seed=1),
        "all": make_adapter(root / "all", tiny_folder, targets=ALL_TARGETS, rank=8, alpha=16, seed=2,
                            use_rslora=True),
    }


@pytest.fixture(scope="module")
def references(tiny_folder, adapters):
    """Each adapter's (and the base model's, None) greedy output per prompt, from HF with the adapter merged."""
    out = {}
    for name, folder in [(None, None), *adapters.items()]:
        hf = merged_hf_model(tiny_folder, folder)
        out[name] = [hf_greedy(hf, p, MAX_TOKENS) for p in PROMPTS]
    return out


def lora_modules(adapters) -> str:
    return ",".join(f"{name}={folder}" for name, folder in adapters.items())


def run_all(engine, requests: list[tuple[list[int], SamplingParams]]):
    """Every request in flight together; their outputs in order."""
    streams = [engine.add_request(f"r{time.monotonic_ns()}-{i}", p, params) for i, (p, params) in enumerate(requests)]
    return [s.result() for s in streams]


@pytest.mark.parametrize("overrides", [
    dict(),
    dict(cpu_compile_decode=True),  # base-model decode steps compiled, steps with adapted tokens eager
    dict(num_kv_blocks=24, max_num_batched_tokens=16),  # preemption by recompute
    # CUDA: base-model steps replay CUDA graphs, steps with adapted tokens run eagerly (fp32: HF's numbers)
    pytest.param(dict(device="cuda", dtype="float32"),
                 marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"), id="cuda"),
])
def test_each_adapter_equals_hf_with_it_merged_and_a_mixed_batch_equals_each_alone(tiny_folder, adapters,
                                                                                  references, overrides):
    engine = make_tiny_engine(tiny_folder, lora_modules=lora_modules(adapters), **overrides).start()
    try:
        for name in (None, "vou", "all"):  # one adapter at a time
            outs = engine.generate(PROMPTS, greedy(name))
            assert [o.token_ids for o in outs] == references[name], name
        assert references["vou"] != references[None] and references["all"] != references[None]
        # All three on every prompt in flight together: base rows, and rows of each adapter, in the same steps.
        mixed = [(p, greedy(name)) for p in PROMPTS for name in (None, "vou", "all")]
        outs = run_all(engine, mixed)
        for (p, params), out in zip(mixed, outs):
            assert out.token_ids == references[params.lora_name][PROMPTS.index(p)], params.lora_name
        if "num_kv_blocks" in overrides:
            assert engine.stats().num_preemptions > 0
        assert engine.stats().kv_usage == 0.0
    finally:
        engine.shutdown()


def test_prefix_cache_is_shared_within_an_adapter_never_across(tiny_folder, adapters, references):
    engine = make_tiny_engine(tiny_folder, lora_modules=lora_modules(adapters)).start()
    try:
        prompt = PROMPTS[2]  # 27 tokens: 6 full blocks of 4 to cache
        base = engine.generate([prompt], greedy())[0]
        first = engine.generate([prompt], greedy("all"))[0]
        again = engine.generate([prompt], greedy("all"))[0]
        other = engine.generate([prompt], greedy("vou"))[0]
        assert base.token_ids == references[None][2]
        assert first.num_cached_tokens == 0  # the base model's blocks hold other K/V
        assert first.token_ids == again.token_ids == references["all"][2]
        assert again.num_cached_tokens == 24
        assert other.num_cached_tokens == 0 and other.token_ids == references["vou"][2]
    finally:
        engine.shutdown()


def test_speculative_decoding_keeps_the_adapters_output(tiny_folder, adapters, references):
    engine = make_tiny_engine(tiny_folder, lora_modules=lora_modules(adapters), speculative_method="ngram",
                              num_speculative_tokens=3).start()
    try:
        for name in (None, "all"):
            assert [o.token_ids for o in engine.generate(PROMPTS, greedy(name))] == references[name], name
    finally:
        engine.shutdown()


def test_an_unknown_adapter_is_refused_naming_the_served_ones(tiny_folder, adapters):
    engine = make_tiny_engine(tiny_folder, lora_modules=lora_modules(adapters))
    try:
        with pytest.raises(ValueError, match="lora_name 'sql' is not a LoRA adapter of this model; this model "
                                             "serves vou, all"):
            engine.add_request("x", PROMPTS[0], greedy("sql"))
    finally:
        engine.shutdown()
    engine = make_tiny_engine(tiny_folder)
    try:
        with pytest.raises(ValueError, match="serves none"):
            engine.add_request("x", PROMPTS[0], greedy("vou"))
    finally:
        engine.shutdown()
    with pytest.raises(ValueError, match="lora_name must be"):
        SamplingParams.from_dict({"lora_name": 3})


def test_lora_modules_parse_and_refusals():
    assert parse_lora_modules(" a = /x/a , b=/y ,") == {"a": "/x/a", "b": "/y"}
    assert parse_lora_modules("") == {}
    for bad in ("a", "a=", "=p", "a b=p"):
        with pytest.raises(ValueError, match="want name=path"):
            parse_lora_modules(bad)
    with pytest.raises(ValueError, match="names 'a' twice"):
        parse_lora_modules("a=/1,a=/2")
    with pytest.raises(ValueError, match="torch runner on one device"):
        EngineConfig(lora_modules="a=/x", runner="onnxruntime")
    with pytest.raises(ValueError, match="torch runner on one device"):
        EngineConfig(lora_modules="a=/x", tensor_parallel_size=2)


@pytest.mark.parametrize("change, message", [
    (dict(use_dora=True), "DoRA"),
    (dict(modules_to_save=["lm_head"]), "modules_to_save"),
    (dict(bias="lora_only"), "bias"),
    (dict(peft_type="IA3"), "only LoRA"),
    (dict(lora_bias=True), "lora_bias"),
    (dict(trainable_token_indices=[5, 7]), "trainable_token_indices"),
    (dict(fan_in_fan_out=True), "fan_in_fan_out"),
])
def test_adapters_served_otherwise_than_trained_are_refused(tiny_folder, tmp_path, change, message):
    folder = make_adapter(tmp_path / "a", tiny_folder, **change)
    with pytest.raises(ValueError, match=f"LoRA adapter 'a' .*{message}"):
        load_adapter("a", folder, ModelConfig.from_pretrained(tiny_folder))


def test_adapters_of_another_model_or_without_files_are_refused(tiny_folder, tmp_path):
    cfg = ModelConfig.from_pretrained(tiny_folder)
    with pytest.raises(ValueError, match="needs adapter_config.json and adapter_model.safetensors"):
        load_adapter("a", tmp_path, cfg)
    folder = make_adapter(tmp_path / "a", tiny_folder)
    other = ModelConfig.from_dict({**json.loads((tiny_folder / "config.json").read_text()), "hidden_size": 128})
    with pytest.raises(ValueError, match="an adapter of another base model"):
        load_adapter("a", folder, other)
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(folder / "adapter_model.safetensors"))
    tensors["base_model.model.lm_head.lora_A.weight"] = torch.zeros(4, 64)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="adapts no decoder-layer projection"):
        load_adapter("a", folder, cfg)


def test_the_base_models_chain_is_unchanged_and_namespaces_do_not_meet():
    bm = BlockManager(16, 4)
    tokens = list(range(12))
    assert bm.allocate_slots("base", tokens, 0, 12) is not None
    assert bm.get_computed_blocks(tokens + [1])[1] == 12
    assert bm.get_computed_blocks(tokens + [1], namespace=1)[1] == 0
    assert bm.allocate_slots("lora", tokens, 0, 12, namespace=1) is not None
    assert bm.get_computed_blocks(tokens + [1], namespace=1)[1] == 12
    assert bm.get_computed_blocks(tokens + [1], namespace=2)[1] == 0


def test_a_rank_and_alpha_per_module_are_served_as_peft_gives_them(tiny_folder, tmp_path):
    """rank_pattern and alpha_pattern (PEFT's keys: a module's name or a dot-separated tail of it, as regular
    expressions): each module's scaling is its own alpha over its own rank, as PEFT merges it. (Checked against
    PEFT 0.21.2's merge_and_unload too, outside CI, where PEFT is not installed.)"""
    layers = ModelConfig.from_pretrained(tiny_folder).num_layers
    ranks = {(layer, "q_proj"): 8 for layer in range(layers)} | {(0, "up_proj"): 2}
    alphas = {(1, "v_proj"): 3.0} | {(layer, "up_proj"): 24.0 for layer in range(layers)}
    folder = make_adapter(tmp_path / "p", tiny_folder, targets=("q_proj", "v_proj", "up_proj"), rank=4, alpha=8,
                          scale=2, seed=3, ranks=ranks,
                          rank_pattern={"q_proj": 8, "layers.0.mlp.up_proj": 2},
                          alpha_pattern={r"layers\.1\.self_attn\.v_proj": 3.0, "up_proj": 24.0})
    adapter = load_adapter("p", folder, ModelConfig.from_pretrained(tiny_folder))
    assert adapter.rank == 8 and adapter.weights[(0, "mlp.up_proj")][0].shape[0] == 2
    reference = merged_hf_model(tiny_folder, folder, alphas)
    engine = make_tiny_engine(tiny_folder, lora_modules=f"p={folder}").start()
    try:
        outs = engine.generate(PROMPTS, greedy("p"))
    finally:
        engine.shutdown()
    assert [o.token_ids for o in outs] == [hf_greedy(reference, p, MAX_TOKENS) for p in PROMPTS]
