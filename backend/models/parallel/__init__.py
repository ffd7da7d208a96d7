"""Tensor parallelism for the Llama core: Megatron's split with vLLM's layer names.

linear.py: ColumnParallelLinear, MergedColumnParallelLinear (gate/up), QKVParallelLinear,
RowParallelLinear (one all-reduce). vocab_parallel_embedding.py: VocabParallelEmbedding and
ParallelLMHead (logits gathered). sharding.py: which model splits over how many ranks.
sharded_loader.py: each rank reads only its shard of the checkpoint.
"""
