"""Vocab-parallel embedding and output head: each tensor-parallel rank holds a contiguous slice of the vocabulary."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.engine import parallel


class VocabParallelEmbedding(nn.Module):
    def __init__(self, num_embeddings: int, embedding_dim: int, params_dtype: torch.dtype | None = None):
        super().__init__()
        self.tp_rank, self.tp_size = parallel.tp_rank(), parallel.tp_size()
        self.num_embeddings = num_embeddings
        self.per_partition = -(-num_embeddings // self.tp_size)
        self.vocab_start = self.tp_rank * self.per_partition
        self.vocab_end = min(self.vocab_start + self.per_partition, num_embeddings)
        self.weight = nn.Parameter(torch.zeros(self.per_partition, embedding_dim, dtype=params_dtype),
                                   requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        part = loaded[self.vocab_start:self.vocab_end]
        if part.shape[1:] != param.shape[1:] or part.shape[0] > param.shape[0]:
            raise ValueError(f"embedding of shape {tuple(loaded.shape)} does not fit "
                             f"[{self.num_embeddings}, {param.shape[1]}]")
        param.data[:part.shape[0]].copy_(part)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(ids, self.weight)
        mask = (ids >= self.vocab_start) & (ids < self.vocab_end)
        y = F.embedding(torch.where(mask, ids - self.vocab_start, 0), self.weight) * mask[:, None]
        return parallel.all_reduce(y)


class ParallelLMHead(VocabParallelEmbedding):
    """The output projection; logits are gathered to the full vocabulary on every rank."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = F.linear(x, self.weight)  # [T, V/tp]
        if self.tp_size > 1:
            logits = parallel.all_gather_last_dim(logits)
        return logits[:, :self.num_embeddings]
