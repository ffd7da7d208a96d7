"""Paged KV-cache block manager with prefix caching.

The KV cache is a pool of ``num_blocks`` fixed-size blocks per layer
(``[num_blocks, block_size, kv_heads, head_dim]`` for K and for V). This
module owns only the bookkeeping: which block ids a sequence holds (its block
table), how many sequences share a block, and which full blocks can be reused
by a later prompt with the same prefix. It never touches tensors, so the
scheduler and this manager are the same for every runner.

Token i of a sequence lives in slot
``block_table[i // block_size] * block_size + i % block_size``.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence


@dataclass(eq=False)
class KVCacheBlock:
    """One block of the pool. Identity (not value) equality: two blocks with
    equal fields are still two different places in memory."""

    block_id: int
    ref_cnt: int = 0
    # Set once the block is full and registered for prefix reuse; cleared on eviction.
    block_hash: int | None = None


def hash_block_tokens(parent_hash: int | None, block_tokens: Sequence[int]) -> int:
    """Chained hash of one full block: it depends on every token before it, so
    equal tokens after a different prefix (hence different K/V) never match.

    Python's tuple hash is fast but not collision-resistant; it is only
    meaningful inside one process, which is the only place the cache lives.
    """
    return hash((parent_hash, tuple(block_tokens)))


def chain_root(namespace: int) -> int | None:
    """The parent hash of a sequence's first block. Namespace 0 (the base model) has None; another (a LoRA
    adapter, whose K/V for the same tokens differ) a root of its own, so its blocks match only its own."""
    return None if namespace == 0 else hash(("namespace", namespace))


class BlockManager:
    """Allocates KV blocks to sequences and reuses full blocks across prompts.

    Invariants (checked by tests/test_block_manager.py after every operation):

    - Every block is in exactly one of two states: free (``ref_cnt == 0``, in
      the free queue) or in use (``ref_cnt > 0``, not in the queue). Hence
      ``num_free_blocks + blocks in use == num_blocks``.
    - ``ref_cnt`` of a block equals the number of block tables holding it.
    - The free queue is LRU order: allocation pops from the front, freeing
      appends to the back. A fresh manager's queue is ``0..num_blocks-1``, so
      it hands out 0, 1, 2, ... A sequence's blocks are appended in reverse
      table order, so its tail is evicted before its (likely shared) head.
    - Free blocks keep their hash and stay findable as prefix hits until they
      are popped for reuse; popping a hashed block evicts its hash first.
    - ``_cached_blocks`` maps hash -> block one to one: ``block.block_hash == h``
      for every entry and every hashed block is an entry. A second full block
      with an already-registered hash is simply not registered.
    - A block is hashed only once full, and its tokens never change after
      that. Blocks become cached when *scheduled*, before the forward pass
      that writes them; a sequence that hits such a block in the same step
      is safe only because a runner writes all new K/V of a layer into the
      pool before any attention of that layer reads it.
    - Prefix caching off: nothing is hashed, nothing is looked up.

    Free-queue operations are O(1): an ``OrderedDict`` keyed by block id gives
    pop-front, append and remove-from-the-middle (reviving a cached block).
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if not isinstance(num_blocks, int) or num_blocks < 1:
            raise ValueError(
                f"num_blocks must be a positive int, got {num_blocks!r}; "
                "size the KV pool to hold at least one block")
        if not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be a positive int, got {block_size!r}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks: list[KVCacheBlock] = [KVCacheBlock(i) for i in range(num_blocks)]
        self._free_queue: OrderedDict[int, KVCacheBlock] = OrderedDict(
            (b.block_id, b) for b in self.blocks)
        self._cached_blocks: dict[int, KVCacheBlock] = {}
        self._tables: dict[str, list[KVCacheBlock]] = {}
        # Chained hashes of each sequence's full blocks, in order. Kept apart
        # from block.block_hash because a full block whose hash was already
        # registered by another block stays unhashed, yet the chain must go on.
        self._seq_hashes: dict[str, list[int]] = {}
        self._seq_roots: dict[str, int] = {}  # the chain root of each sequence outside namespace 0 (chain_root)
        # Metrics, in tokens, counted once per admitted sequence (first
        # allocation), so a prompt that waits and is looked up again is not
        # counted twice.
        self.prefix_queries = 0
        self.prefix_hits = 0

    # ---------------------------------------------------------------- queries

    @property
    def num_free_blocks(self) -> int:
        """Blocks allocatable now: ref_cnt 0, cached-but-free ones included."""
        return len(self._free_queue)

    @property
    def usage(self) -> float:
        """Fraction of blocks held by some sequence, in [0, 1]."""
        return (self.num_blocks - len(self._free_queue)) / self.num_blocks

    def num_blocks_needed(self, num_tokens: int) -> int:
        if num_tokens < 0:
            raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
        return -(-num_tokens // self.block_size)

    def block_table(self, request_id: str) -> list[int]:
        """Block ids of the sequence in token order; [] for an unknown sequence."""
        return [b.block_id for b in self._tables.get(request_id, ())]

    def get_computed_blocks(self, token_ids: Sequence[int], namespace: int = 0) -> tuple[list[KVCacheBlock], int]:
        """Longest run of full prompt blocks already cached, and the tokens they cover.

        At least one token is always left to compute (its logits are needed),
        so only the first ``(len(token_ids) - 1) // block_size`` blocks are
        candidates. Pure: changes no state. ([], 0) when prefix caching is off.
        """
        if not self.enable_prefix_caching:
            return [], 0
        hits: list[KVCacheBlock] = []
        parent = chain_root(namespace)
        bs = self.block_size
        for i in range(max(len(token_ids) - 1, 0) // bs):
            parent = hash_block_tokens(parent, token_ids[i * bs:(i + 1) * bs])
            block = self._cached_blocks.get(parent)
            if block is None:
                break
            hits.append(block)
        return hits, len(hits) * bs

    # -------------------------------------------------------------- mutations

    def allocate_slots(self, request_id: str, token_ids: Sequence[int], num_computed_tokens: int,
                       num_new_tokens: int, new_computed_blocks: list[KVCacheBlock] | None = None,
                       num_placeholders: int = 0, namespace: int = 0) -> list[int] | None:
        """Grow the sequence's block table to cover num_computed + num_new tokens.

        ``new_computed_blocks`` (prefix hits from :meth:`get_computed_blocks`)
        may be passed only on the sequence's first allocation, and
        ``num_computed_tokens`` then already counts the tokens they cover.
        ``num_placeholders``: the last tokens being computed are sampled but not
        yet known on the host (async scheduling); they get slots, and a block
        is hashed only once all its tokens are known (a later call).
        ``namespace``: the sequence's prefix-cache namespace (chain_root), the
        one `get_computed_blocks` was given; read on the first allocation.
        Returns the newly allocated block ids, or None when the pool is short;
        then nothing has changed. Every block that becomes full of known tokens
        by this step is registered for prefix reuse at once.
        """
        hits = new_computed_blocks or []
        table = self._tables.get(request_id)
        self._validate_request(request_id, table, token_ids, num_computed_tokens, num_new_tokens, hits,
                               num_placeholders, namespace)
        num_held = (len(table) if table is not None else 0) + len(hits)
        num_total = num_computed_tokens + num_new_tokens
        num_new_blocks = max(self.num_blocks_needed(num_total) - num_held, 0)
        # Hit blocks that sit in the free queue leave it when taken, so they
        # compete with the new blocks for the same free capacity.
        num_revived = sum(b.ref_cnt == 0 for b in hits) if hits else 0
        if num_new_blocks + num_revived > len(self._free_queue):
            return None

        if table is None:
            table = self._tables[request_id] = []
            if self.enable_prefix_caching:
                if namespace:
                    self._seq_roots[request_id] = chain_root(namespace)
                self._seq_hashes[request_id] = [b.block_hash for b in hits]
                self.prefix_queries += len(token_ids)
                self.prefix_hits += len(hits) * self.block_size
        # Take the hits before popping new blocks: popping could otherwise
        # evict a hit block that is still at the front of the queue.
        for block in hits:
            if block.ref_cnt == 0:
                del self._free_queue[block.block_id]
            block.ref_cnt += 1
        table.extend(hits)
        new_blocks = [self._pop_free_block() for _ in range(num_new_blocks)]
        table.extend(new_blocks)

        if self.enable_prefix_caching:
            self._register_full_blocks(request_id, table, token_ids, min(num_total, len(token_ids)))
        return [b.block_id for b in new_blocks]

    def free(self, request_id: str) -> None:
        """Release the sequence's blocks. Unknown request_id: no-op.

        Blocks reaching ref_cnt 0 join the back of the free queue in reverse
        table order, so the sequence's head (the part other prompts are most
        likely to share) is evicted last. Hashed blocks stay findable.
        """
        table = self._tables.pop(request_id, None)
        self._seq_hashes.pop(request_id, None)
        self._seq_roots.pop(request_id, None)
        if table is None:
            return
        for block in reversed(table):
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self._free_queue[block.block_id] = block

    def trim(self, request_id: str, num_tokens: int) -> list[int]:
        """Keep only the blocks that hold the sequence's first ``num_tokens`` tokens; return its table.

        Speculative decoding: a verify step allocates slots for every proposed token, and the rejected
        ones' K/V is dead. Their blocks past the kept tokens go back to the free queue (unhashed: a block
        is hashed only once all its tokens are known, and proposals never are), so the counts stay as if
        the rejected tokens had never been scheduled. K/V of rejected tokens inside a kept block is
        overwritten when the sequence computes those positions again.
        """
        table = self._tables.get(request_id)
        if table is None:
            return []
        keep = self.num_blocks_needed(num_tokens)
        hashes = self._seq_hashes.get(request_id, ())
        if len(hashes) * self.block_size > num_tokens:
            raise ValueError(f"sequence {request_id!r}: cannot trim to {num_tokens} tokens, its first "
                             f"{len(hashes) * self.block_size} are hashed for prefix reuse")
        for block in reversed(table[keep:]):
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self._free_queue[block.block_id] = block
        del table[keep:]
        return [b.block_id for b in table]

    def reset_prefix_cache(self) -> bool:
        """Forget every cached hash. Only allowed with no block in use, since a
        running sequence's chain would otherwise point at forgotten blocks;
        returns False (and changes nothing) in that case."""
        if len(self._free_queue) != self.num_blocks:
            return False
        for block in self._cached_blocks.values():
            block.block_hash = None
        self._cached_blocks.clear()
        return True

    # ---------------------------------------------------------------- helpers

    def _validate_request(self, request_id: str, table: list[KVCacheBlock] | None,
                          token_ids: Sequence[int], num_computed_tokens: int,
                          num_new_tokens: int, hits: list[KVCacheBlock], num_placeholders: int = 0,
                          namespace: int = 0) -> None:
        """Reject caller bugs loudly; a silent mistake here corrupts KV of other sequences."""
        if num_computed_tokens < 0 or num_new_tokens < 0:
            raise ValueError(
                f"sequence {request_id!r}: num_computed_tokens ({num_computed_tokens}) and "
                f"num_new_tokens ({num_new_tokens}) must be >= 0")
        if num_computed_tokens + num_new_tokens > len(token_ids) + num_placeholders:
            raise ValueError(
                f"sequence {request_id!r}: token_ids has {len(token_ids)} tokens (+{num_placeholders} "
                f"placeholders) but "
                f"{num_computed_tokens} computed + {num_new_tokens} new were asked for; "
                "append the tokens being computed to token_ids before scheduling them")
        if hits and table is not None:
            raise ValueError(
                f"sequence {request_id!r} already holds blocks; new_computed_blocks may be "
                "passed only on its first allocation")
        if table is None and num_computed_tokens != len(hits) * self.block_size:
            # More would claim K/V that was never written; fewer would rewrite shared blocks.
            raise ValueError(
                f"sequence {request_id!r}: on a first allocation num_computed_tokens must equal the "
                f"tokens covered by new_computed_blocks ({len(hits) * self.block_size}), "
                f"got {num_computed_tokens}")
        if table is not None and len(table) * self.block_size < num_computed_tokens:
            raise ValueError(
                f"sequence {request_id!r}: {num_computed_tokens} tokens counted as computed but its "
                f"{len(table)} blocks hold only {len(table) * self.block_size}")
        if not hits:
            return
        # A hit is only valid while the block still holds this prompt's
        # prefix: it may have been evicted and refilled since the lookup.
        parent = chain_root(namespace)
        bs = self.block_size
        for i, block in enumerate(hits):
            parent = hash_block_tokens(parent, token_ids[i * bs:(i + 1) * bs])
            if block.block_hash != parent or self._cached_blocks.get(parent) is not block:
                raise ValueError(
                    f"sequence {request_id!r}: prefix-hit block {block.block_id} no longer holds "
                    "this prompt's prefix (evicted since get_computed_blocks?); call "
                    "get_computed_blocks right before allocate_slots")

    def _pop_free_block(self) -> KVCacheBlock:
        _, block = self._free_queue.popitem(last=False)
        if block.block_hash is not None:
            # Evict: the block is about to hold other tokens.
            del self._cached_blocks[block.block_hash]
            block.block_hash = None
        block.ref_cnt = 1
        return block

    def _register_full_blocks(self, request_id: str, table: list[KVCacheBlock],
                              token_ids: Sequence[int], num_tokens: int) -> None:
        """Hash blocks that are full once ``num_tokens`` tokens are computed."""
        hashes = self._seq_hashes[request_id]
        bs = self.block_size
        for i in range(len(hashes), num_tokens // bs):
            parent = hashes[-1] if hashes else self._seq_roots.get(request_id)
            h = hash_block_tokens(parent, token_ids[i * bs:(i + 1) * bs])
            hashes.append(h)
            block = table[i]
            if block.block_hash is None and h not in self._cached_blocks:
                block.block_hash = h
                self._cached_blocks[h] = block
