"""BlockManager: exact block ids, LRU eviction order, prefix reuse, no leaks."""

import random

import pytest

from kvtriton.backend.engine.block_manager import BlockManager, KVCacheBlock, hash_block_tokens

BS = 4  # block size used throughout: small enough to reason about ids by hand


def free_queue_ids(bm: BlockManager) -> list[int]:
    return list(bm._free_queue)


def check_invariants(bm: BlockManager) -> None:
    """The class-docstring invariants, checked from the outside in."""
    holders: dict[int, int] = {}
    for table in bm._tables.values():
        for block in table:
            holders[block.block_id] = holders.get(block.block_id, 0) + 1
    in_use = 0
    for block in bm.blocks:
        assert block.ref_cnt == holders.get(block.block_id, 0), block
        in_free_queue = block.block_id in bm._free_queue
        assert in_free_queue == (block.ref_cnt == 0), block
        in_use += block.ref_cnt > 0
        if block.block_hash is not None:
            assert bm._cached_blocks[block.block_hash] is block
    assert bm.num_free_blocks + in_use == bm.num_blocks
    assert bm.usage == pytest.approx(in_use / bm.num_blocks)
    for h, block in bm._cached_blocks.items():
        assert block.block_hash == h
    if not bm.enable_prefix_caching:
        assert not bm._cached_blocks


def admit(bm: BlockManager, request_id: str, tokens: list[int], num_new: int | None = None):
    """Scheduler-style admission: look up the prefix, then allocate the rest."""
    hits, num_hit = bm.get_computed_blocks(tokens)
    if num_new is None:
        num_new = len(tokens) - num_hit
    return bm.allocate_slots(request_id, tokens, num_hit, num_new, hits), num_hit


# ------------------------------------------------------------ allocation order

def test_fresh_manager_hands_out_ids_in_order():
    bm = BlockManager(num_blocks=8, block_size=BS)
    assert bm.allocate_slots("a", list(range(10)), 0, 10) == [0, 1, 2]
    assert bm.allocate_slots("b", list(range(5)), 0, 5) == [3, 4]
    assert bm.block_table("a") == [0, 1, 2]
    assert bm.num_free_blocks == 3
    assert bm.usage == pytest.approx(5 / 8)
    check_invariants(bm)


def test_decode_growth_allocates_exactly_at_block_boundaries():
    bm = BlockManager(num_blocks=8, block_size=BS)
    tokens = [7, 7, 7, 7]
    assert bm.allocate_slots("a", tokens, 0, 4) == [0]
    new_blocks = []
    for num_computed in range(4, 13):  # decode one token per step: tokens 5..13
        tokens.append(num_computed)
        new_blocks.append(bm.allocate_slots("a", tokens, num_computed, 1))
    # Token 5 opens block 1, token 9 opens block 2, token 13 opens block 3.
    assert new_blocks == [[1], [], [], [], [2], [], [], [], [3]]
    assert bm.block_table("a") == [0, 1, 2, 3]
    check_invariants(bm)


def test_num_blocks_needed_is_ceil_division():
    bm = BlockManager(num_blocks=2, block_size=BS)
    assert [bm.num_blocks_needed(n) for n in (0, 1, 4, 5, 8, 9)] == [0, 1, 1, 2, 2, 3]


def test_failed_allocation_changes_nothing():
    bm = BlockManager(num_blocks=4, block_size=BS)
    assert bm.allocate_slots("a", list(range(12)), 0, 12) == [0, 1, 2]
    before = (free_queue_ids(bm), bm.block_table("a"), bm.usage)
    assert bm.allocate_slots("b", list(range(8)), 0, 8) is None  # needs 2, 1 free
    assert bm.allocate_slots("a", list(range(20)), 12, 8) is None  # growth needs 2
    assert (free_queue_ids(bm), bm.block_table("a"), bm.usage) == before
    assert bm.block_table("b") == []
    assert "b" not in bm._tables  # a failed first allocation leaves no trace
    check_invariants(bm)
    assert bm.allocate_slots("b", list(range(4)), 0, 4) == [3]


def test_failed_allocation_with_prefix_hit_leaves_hit_blocks_free_and_cached():
    bm = BlockManager(num_blocks=4, block_size=BS)
    prompt = list(range(9))
    bm.allocate_slots("a", prompt, 0, 9)  # blocks 0, 1 full and cached; 2 partial
    bm.free("a")
    bm.allocate_slots("x", [50] * 8, 0, 8)  # takes 3 and 2 (the free-queue front)
    assert bm.num_free_blocks == 2
    # b hits blocks 0 and 1 (both free) and needs 1 more: 3 free blocks needed, 2 exist.
    hits, num_hit = bm.get_computed_blocks(prompt)
    assert [b.block_id for b in hits] == [0, 1] and num_hit == 8
    assert bm.allocate_slots("b", prompt, 8, 1, hits) is None
    assert [b.ref_cnt for b in hits] == [0, 0]
    assert free_queue_ids(bm) == [1, 0]
    assert bm.get_computed_blocks(prompt) == (hits, 8)
    assert bm.prefix_hits == 0  # counted only when the sequence is admitted
    check_invariants(bm)


# ----------------------------------------------------------- free and eviction

def test_free_returns_blocks_in_reverse_order_and_eviction_is_lru():
    bm = BlockManager(num_blocks=6, block_size=BS, enable_prefix_caching=False)
    bm.allocate_slots("a", list(range(12)), 0, 12)  # 0, 1, 2
    bm.allocate_slots("b", list(range(8)), 0, 8)  # 3, 4
    bm.free("a")
    assert free_queue_ids(bm) == [5, 2, 1, 0]
    bm.free("b")
    assert free_queue_ids(bm) == [5, 2, 1, 0, 4, 3]
    check_invariants(bm)
    assert bm.allocate_slots("c", list(range(24)), 0, 24) == [5, 2, 1, 0, 4, 3]
    bm.free("unknown")  # no-op
    check_invariants(bm)


def test_shared_block_is_freed_only_by_its_last_holder():
    bm = BlockManager(num_blocks=4, block_size=BS)
    prompt = list(range(6))
    admit(bm, "a", prompt)  # 0 (full, cached), 1
    (new, num_hit) = admit(bm, "b", prompt)
    assert num_hit == 4 and new == [2]
    bm.free("a")
    assert bm.blocks[0].ref_cnt == 1 and free_queue_ids(bm) == [3, 1]
    bm.free("b")
    assert free_queue_ids(bm) == [3, 1, 2, 0]
    check_invariants(bm)


# ---------------------------------------------------------------- prefix hits

def test_prefix_hit_shares_the_first_full_blocks():
    bm = BlockManager(num_blocks=8, block_size=BS)
    a = list(range(10))  # blocks 0, 1 full; 2 partial
    b = list(range(8)) + [90, 91, 92]  # same first 2 blocks, own tail
    assert admit(bm, "a", a) == ([0, 1, 2], 0)
    hits, num_hit = bm.get_computed_blocks(b)
    assert [h.block_id for h in hits] == [0, 1] and num_hit == 2 * BS
    assert bm.allocate_slots("b", b, num_hit, len(b) - num_hit, hits) == [3]
    assert bm.block_table("b") == [0, 1, 3]
    assert [bm.blocks[i].ref_cnt for i in range(4)] == [2, 2, 1, 1]
    assert (bm.prefix_queries, bm.prefix_hits) == (len(a) + len(b), 8)
    check_invariants(bm)


def test_prompt_of_exactly_k_full_blocks_hits_only_k_minus_1():
    bm = BlockManager(num_blocks=8, block_size=BS)
    prompt = list(range(8))
    admit(bm, "a", prompt)  # blocks 0, 1 both full and cached
    hits, num_hit = bm.get_computed_blocks(prompt)
    assert [h.block_id for h in hits] == [0] and num_hit == BS
    assert bm.allocate_slots("b", prompt, num_hit, BS, hits) == [2]
    # Block 2 holds the same tokens as block 1, whose hash is taken: one block per hash.
    assert bm.blocks[2].block_hash is None
    assert bm.blocks[1].block_hash == bm._seq_hashes["b"][1]
    check_invariants(bm)


def test_blocks_filled_by_a_prefill_chunk_are_cached_at_once():
    bm = BlockManager(num_blocks=8, block_size=BS)
    prompt = list(range(13))
    bm.allocate_slots("a", prompt, 0, 5)  # chunk 1: block 0 full
    assert bm.get_computed_blocks(prompt)[1] == 4
    bm.allocate_slots("a", prompt, 5, 5)  # chunk 2: block 1 full
    assert bm.get_computed_blocks(prompt)[1] == 8
    bm.allocate_slots("a", prompt, 10, 3)  # last chunk: block 2 full
    assert bm.get_computed_blocks(prompt)[1] == 12
    assert bm.get_computed_blocks(prompt[:12])[1] == 8  # its last token is left to compute
    check_invariants(bm)


def test_cached_free_block_is_revived_by_a_hit_then_evicted_when_the_pool_needs_it():
    bm = BlockManager(num_blocks=4, block_size=BS)
    prompt = list(range(9))
    assert admit(bm, "a", prompt) == ([0, 1, 2], 0)
    bm.free("a")
    assert free_queue_ids(bm) == [3, 2, 1, 0]
    # The owner finished, yet its full blocks are still hits.
    new, num_hit = admit(bm, "b", prompt)
    assert num_hit == 8 and new == [3] and bm.block_table("b") == [0, 1, 3]
    assert free_queue_ids(bm) == [2]  # 0 and 1 were taken out of the middle of the queue
    bm.free("b")
    assert free_queue_ids(bm) == [2, 3, 1, 0]
    # Other work needs 3 blocks: the LRU front (2, 3, then b's block 1) is evicted.
    assert bm.allocate_slots("c", [60] * 12, 0, 12) == [2, 3, 1]
    hits, num_hit = bm.get_computed_blocks(prompt)
    assert [h.block_id for h in hits] == [0] and num_hit == BS  # head survived longest
    bm.allocate_slots("d", [70] * 4, 0, 4)  # evicts block 0 too
    assert bm.get_computed_blocks(prompt) == ([], 0)
    assert bm.blocks[0].block_hash == hash_block_tokens(None, [70] * 4)  # now d's
    check_invariants(bm)


def test_same_block_after_a_different_prefix_is_not_a_hit():
    bm = BlockManager(num_blocks=8, block_size=BS)
    admit(bm, "a", [1, 2, 3, 4, 5, 6, 7, 8, 9])  # blocks 0 and 1 cached
    admit(bm, "b", [9, 9, 9, 9, 0])  # block 3 caches [9, 9, 9, 9]
    # [5, 6, 7, 8] is cached, but only after [1, 2, 3, 4]: the hit stops after b's block.
    hits, num_hit = bm.get_computed_blocks([9, 9, 9, 9, 5, 6, 7, 8, 9])
    assert [h.block_id for h in hits] == [3] and num_hit == BS
    hits, num_hit = bm.get_computed_blocks([1, 2, 3, 4, 0, 0, 0, 0, 5, 6, 7, 8, 9])
    assert [h.block_id for h in hits] == [0] and num_hit == BS
    # The chained hash is exactly hash((parent_hash, tuple(block_tokens))).
    assert bm.blocks[1].block_hash == hash((hash((None, (1, 2, 3, 4))), (5, 6, 7, 8)))


def test_prefix_caching_off_never_hits_or_hashes():
    bm = BlockManager(num_blocks=8, block_size=BS, enable_prefix_caching=False)
    prompt = list(range(9))
    assert admit(bm, "a", prompt) == ([0, 1, 2], 0)
    assert bm.get_computed_blocks(prompt) == ([], 0)
    assert admit(bm, "b", prompt) == ([3, 4, 5], 0)
    assert all(b.block_hash is None for b in bm.blocks)
    assert (bm.prefix_queries, bm.prefix_hits) == (0, 0)
    check_invariants(bm)


def test_reset_prefix_cache_only_when_nothing_is_in_use():
    bm = BlockManager(num_blocks=4, block_size=BS)
    prompt = list(range(9))
    admit(bm, "a", prompt)
    assert bm.reset_prefix_cache() is False
    assert bm.get_computed_blocks(prompt)[1] == 8
    bm.free("a")
    assert bm.reset_prefix_cache() is True
    assert bm.get_computed_blocks(prompt) == ([], 0)
    assert all(b.block_hash is None for b in bm.blocks)
    check_invariants(bm)


# ------------------------------------------------------------- caller errors

@pytest.mark.parametrize("kwargs, field", [
    ({"num_blocks": 0, "block_size": 4}, "num_blocks"),
    ({"num_blocks": 4, "block_size": 0}, "block_size"),
])
def test_invalid_pool_geometry_is_rejected_by_name(kwargs, field):
    with pytest.raises(ValueError, match=field):
        BlockManager(**kwargs)


def test_caller_bugs_are_rejected_before_any_change():
    bm = BlockManager(num_blocks=8, block_size=BS)
    prompt = list(range(9))
    with pytest.raises(ValueError, match="token_ids has 9 tokens"):
        bm.allocate_slots("a", prompt, 0, 10)
    with pytest.raises(ValueError, match="num_computed_tokens"):
        bm.allocate_slots("a", prompt, 4, 1)  # claims computed tokens it has no blocks for
    admit(bm, "a", prompt)
    with pytest.raises(ValueError, match="blocks hold only 12"):
        bm.allocate_slots("a", prompt + [1, 2, 3, 4], 13, 0)
    hits, _ = bm.get_computed_blocks(prompt)
    with pytest.raises(ValueError, match="must equal the tokens covered"):
        bm.allocate_slots("b", prompt, 0, 9, hits)  # would rewrite shared blocks
    hits, _ = bm.get_computed_blocks(prompt)
    with pytest.raises(ValueError, match="first allocation"):
        bm.allocate_slots("a", prompt + [1], 9, 1, hits)
    bm.free("a")
    bm.allocate_slots("x", [5] * 32, 0, 32)  # evicts all; blocks 0, 1 now cached with x's tokens
    with pytest.raises(ValueError, match="no longer holds"):
        bm.allocate_slots("b", prompt, 8, 1, hits)
    x_hits, _ = bm.get_computed_blocks([5] * 9)
    with pytest.raises(ValueError, match="no longer holds"):
        bm.allocate_slots("c", prompt, 8, 1, x_hits)  # hits of another prompt
    bm.free("x")
    stray = KVCacheBlock(block_id=0, block_hash=hash_block_tokens(None, prompt[:4]))
    with pytest.raises(ValueError, match="no longer holds"):
        bm.allocate_slots("c", prompt, 4, 1, [stray])  # not this manager's block
    check_invariants(bm)


# ---------------------------------------------------------------- stress

@pytest.mark.parametrize("enable_prefix_caching", [True, False])
@pytest.mark.parametrize("seed", range(5))
def test_random_schedule_keeps_invariants_and_kv_contents_and_leaks_nothing(seed, enable_prefix_caching):
    """Simulate a scheduler plus a runner that writes each token's id into its
    slot; every live sequence must read back exactly its own tokens, which
    proves that shared prefix blocks never receive another sequence's K/V."""
    rng = random.Random(seed)
    bm = BlockManager(num_blocks=24, block_size=BS, enable_prefix_caching=enable_prefix_caching)
    pool: dict[int, int] = {}  # slot -> token id written there
    prefixes = [[rng.randrange(50) for _ in range(rng.randrange(1, 14))] for _ in range(4)]
    live: dict[str, tuple[list[int], int]] = {}  # request_id -> (token_ids, num_computed)

    def write(request_id: str, tokens: list[int], start: int, stop: int) -> None:
        table = bm.block_table(request_id)
        for i in range(start, stop):
            pool[table[i // BS] * BS + i % BS] = tokens[i]

    for step in range(600):
        op = rng.random()
        if op < 0.3 or not live:
            request_id = f"s{step}"
            tokens = rng.choice(prefixes) + [rng.randrange(50) for _ in range(rng.randrange(1, 10))]
            hits, num_hit = bm.get_computed_blocks(tokens)
            assert num_hit < len(tokens)
            num_new = rng.randint(1, len(tokens) - num_hit)  # chunked prefill
            if bm.allocate_slots(request_id, tokens, num_hit, num_new, hits) is not None:
                write(request_id, tokens, num_hit, num_hit + num_new)
                live[request_id] = (tokens, num_hit + num_new)
        elif op < 0.85:
            request_id = rng.choice(sorted(live))
            tokens, num_computed = live[request_id]
            if num_computed == len(tokens):
                tokens.append(rng.randrange(50))  # decode: the sampled token is known
            num_new = rng.randint(1, len(tokens) - num_computed)
            if bm.allocate_slots(request_id, tokens, num_computed, num_new) is None:
                bm.free(request_id)  # preempt by recompute
                del live[request_id]
            else:
                write(request_id, tokens, num_computed, num_computed + num_new)
                live[request_id] = (tokens, num_computed + num_new)
        else:
            request_id = rng.choice(sorted(live))
            bm.free(request_id)
            del live[request_id]

        check_invariants(bm)
        for request_id, (tokens, num_computed) in live.items():
            table = bm.block_table(request_id)
            assert len(table) == bm.num_blocks_needed(num_computed)
            assert [pool[table[i // BS] * BS + i % BS] for i in range(num_computed)] \
                == tokens[:num_computed]

    if enable_prefix_caching:
        assert 0 < bm.prefix_hits < bm.prefix_queries
    for request_id in list(live):
        bm.free(request_id)
    check_invariants(bm)
    assert bm.num_free_blocks == bm.num_blocks and bm.usage == 0.0
    assert bm.reset_prefix_cache() is True
    assert not bm._cached_blocks
