"""The one place that builds tensors: loads the model, owns the paged KV cache, turns scheduled sequences into
model inputs and the attention context, and returns next-token logits."""
from __future__ import annotations

import torch
from torch import nn

from lowbit.config import EngineConfig, ModelConfig
from lowbit.engine.sequence import Sequence
from lowbit.layers.attention import Context, reset_context, set_context
from lowbit.models.loader import Checkpoint, build_model, load_weights, model_class
from lowbit.quant import gguf

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but no CUDA GPU is available")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device.type!r}")
    return device


def resolve_dtype(dtype: str | torch.dtype, cfg: ModelConfig, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if device.type == "cpu":
            return torch.float32  # the CPU path is the reference: full precision
        return _DTYPES.get(cfg.torch_dtype or "", torch.bfloat16) if cfg.torch_dtype != "float32" else torch.bfloat16
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of auto, float32, bfloat16, float16, got {dtype!r}")
    return _DTYPES[dtype]


class ModelRunner:
    def __init__(self, ckpt: Checkpoint, cfg: ModelConfig, engine_cfg: EngineConfig, dtype: torch.dtype,
                 device: torch.device):
        self.cfg, self.engine_cfg, self.dtype, self.device = cfg, engine_cfg, dtype, device
        self.block_size = engine_cfg.block_size
        quant_config = None
        if ckpt.is_gguf and gguf.int4_gemm_runs(device, dtype):
            # the GGUF's 4-bit weights as stored, through torch's CPU int4 GEMM (bf16 activations)
            ckpt = gguf.StoredQ4Checkpoint(ckpt, model_class(cfg).packed_modules_mapping)
            quant_config = ckpt.quant_config()
        self.model = build_model(ckpt, cfg, dtype, device, quant_config)
        load_weights(self.model, ckpt, device)
        self.model.eval()
        self.attn_modules = [m for m in self.model.model.layers.modules() if hasattr(m, "bind_cache")]
        self.num_blocks = engine_cfg.num_kv_blocks or self._blocks_for_memory(engine_cfg.kv_cache_memory_gb)
        self._allocate_cache(self.num_blocks + 1)  # block num_blocks: scratch for the padding rows of CUDA graphs
        self.graphs = None
        self.greedy_ids: torch.Tensor | None = None  # the last graph step's argmax ids, on the host
        if device.type == "cuda":
            from lowbit.engine.cuda_graphs import capturable, graph_batch_sizes, warm_up_prefill
            # compile every prefill size bucket now, not in the first requests
            warm_up_prefill(self.model, engine_cfg.max_num_batched_tokens, self.num_blocks, self.block_size, device)
            if not engine_cfg.enforce_eager and capturable(self.model):
                self.capture_graphs(graph_batch_sizes(engine_cfg.max_num_seqs))

    def capture_graphs(self, batch_sizes: list[int]) -> None:
        """Capture the decode CUDA graphs for these batch sizes, in place of any captured before (benchmarks capture
        again after changing a launch setting)."""
        from lowbit.engine.cuda_graphs import DecodeGraphs
        if self.graphs is not None:  # the old graphs' memory pool goes before the new one is taken
            self.graphs = None
            torch.cuda.empty_cache()
        self.graphs = DecodeGraphs(self.model, batch_sizes, -(-self.engine_cfg.max_model_len // self.block_size),
                                   self.block_size, self.num_blocks, self.device)

    # ------------------------------------------------------------------ cache
    def kv_bytes_per_block(self) -> int:
        elem = torch.tensor([], dtype=self.dtype).element_size()
        total = 0
        for m in self.attn_modules:
            for shape in m.cache_shape(1, self.block_size):
                n = 1
                for d in shape:
                    n *= d
                total += n * elem
        return total

    def _blocks_for_memory(self, gb: float) -> int:
        return max(1, int(gb * (1 << 30) // self.kv_bytes_per_block()))

    def _allocate_cache(self, num_blocks: int) -> None:
        for m in self.attn_modules:
            m.bind_cache([torch.zeros(s, dtype=self.dtype, device=self.device)
                          for s in m.cache_shape(num_blocks, self.block_size)])

    # ------------------------------------------------------------------ inputs
    def _block_tables(self, seqs: list[Sequence]) -> torch.Tensor:
        width = max(len(s.block_table) for s in seqs)
        rows = [s.block_table + [0] * (width - len(s.block_table)) for s in seqs]
        return torch.tensor(rows, dtype=torch.long, device=self.device)

    def _slot(self, seq: Sequence, i: int) -> int:
        return seq.block_table[i // self.block_size] * self.block_size + i % self.block_size

    def prepare_prefill(self, seqs: list[Sequence]) -> tuple[torch.Tensor, torch.Tensor]:
        ids, pos, slots, qlens, clens = [], [], [], [], []
        for s in seqs:
            start = s.num_cached_tokens
            ids += s.token_ids[start:]
            pos += range(start, len(s))
            slots += [self._slot(s, i) for i in range(start, len(s))]
            qlens.append(len(s) - start)
            clens.append(len(s))
        dev = self.device
        set_context(Context(is_prefill=True, slot_mapping=torch.tensor(slots, dtype=torch.long, device=dev),
                            block_tables=self._block_tables(seqs),
                            context_lens=torch.tensor(clens, dtype=torch.long, device=dev), query_lens=qlens,
                            context_lens_list=clens, block_size=self.block_size))
        return torch.tensor(ids, dtype=torch.long, device=dev), torch.tensor(pos, dtype=torch.long, device=dev)

    def prepare_decode(self, seqs: list[Sequence]) -> tuple[torch.Tensor, torch.Tensor]:
        dev = self.device
        n = [len(s) for s in seqs]
        set_context(Context(is_prefill=False,
                            slot_mapping=torch.tensor([self._slot(s, len(s) - 1) for s in seqs], dtype=torch.long,
                                                      device=dev),
                            block_tables=self._block_tables(seqs),
                            context_lens=torch.tensor(n, dtype=torch.long, device=dev), block_size=self.block_size))
        return (torch.tensor([s.last_token for s in seqs], dtype=torch.long, device=dev),
                torch.tensor([x - 1 for x in n], dtype=torch.long, device=dev))

    # ------------------------------------------------------------------ forward
    @torch.inference_mode()
    def run(self, seqs: list[Sequence], is_prefill: bool, all_logits: bool = False, ahead: bool = False
            ) -> torch.Tensor:
        """Next-token logits: [B, V] for each sequence's last token, or [T, V] for every new token; float32, except
        from a CUDA graph (the model's dtype, with `greedy_ids`, their argmax [B] on the host, set beside).

        ahead: a decode from a CUDA graph also launches the step after this one (DecodeGraphs.run), and its logits
        are not to be read."""
        self.greedy_ids = None
        if not is_prefill and self.graphs is not None and self.graphs.fits(len(seqs)):
            logits, self.greedy_ids = self.graphs.run(seqs, ahead)
            return logits
        ids, pos = self.prepare_prefill(seqs) if is_prefill else self.prepare_decode(seqs)
        try:
            hidden = self.model(ids, pos)  # [T, D]
        finally:
            reset_context()
        if is_prefill and not all_logits:
            last, start = [], -1
            for s in seqs:
                start += len(s) - s.num_cached_tokens
                last.append(start)
            hidden = hidden[torch.tensor(last, device=hidden.device)]
        return self.model.compute_logits(hidden).float()

    def model_module(self) -> nn.Module:
        return self.model
