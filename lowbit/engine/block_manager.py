"""The paged KV cache's bookkeeping: which cache blocks each sequence owns. Plain Python, no tensors."""
from __future__ import annotations

from collections import deque

from lowbit.engine.sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"num_blocks and block_size must be > 0, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.free_blocks: deque[int] = deque(range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    @property
    def usage(self) -> float:
        """Fraction of the cache's blocks in use."""
        return 1.0 - len(self.free_blocks) / self.num_blocks

    def can_allocate(self, seq: Sequence) -> bool:
        return seq.num_blocks(self.block_size) <= len(self.free_blocks)

    def allocate(self, seq: Sequence) -> None:
        """Give a waiting sequence the blocks for all of its tokens."""
        assert not seq.block_table, f"sequence {seq.seq_id} already holds blocks"
        n = seq.num_blocks(self.block_size)
        if n > len(self.free_blocks):
            raise RuntimeError(f"sequence {seq.seq_id} needs {n} blocks, {len(self.free_blocks)} free")
        seq.block_table = [self.free_blocks.popleft() for _ in range(n)]

    def deallocate(self, seq: Sequence) -> None:
        self.free_blocks.extend(seq.block_table)
        seq.block_table = []
        seq.num_cached_tokens = 0

    def can_append(self, seq: Sequence) -> bool:
        """Whether a decode step can reserve the slot of the sequence's last token (index len(seq) - 1)."""
        return len(seq.block_table) * self.block_size >= len(seq) or len(self.free_blocks) > 0

    def may_append(self, seq: Sequence) -> None:
        """Reserve that slot, taking a new block when the last token starts one."""
        if len(seq.block_table) * self.block_size < len(seq):
            seq.block_table.append(self.free_blocks.popleft())

    def reserve_next(self, seqs: list[Sequence]) -> bool:
        """Reserve, for every sequence, the slot of the token after its next one (index len(seq)), where blocks for
        all of them are free: what a decode step launched ahead of the host writes (engine/cuda_graphs.py). The
        next step's may_append then finds its slot taken already. Returns whether it reserved."""
        short = [s for s in seqs if len(s.block_table) * self.block_size <= len(s)]
        if len(short) > len(self.free_blocks):
            return False
        for s in short:
            s.block_table.append(self.free_blocks.popleft())
        return True
