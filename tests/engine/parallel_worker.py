"""One rank of a tensor/expert-parallel run, started by torchrun from tests/engine/test_parallel.py: computes the
logits of fixed token ids and rank 0 saves them."""
import argparse

import torch
import torch.distributed as dist

from lowbit import LLM, SamplingParams


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("out")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--ep", action="store_true")
    args = ap.parse_args()
    llm = LLM(args.model, device="cpu", tensor_parallel_size=args.tp, expert_parallel=args.ep)
    ids = torch.randint(0, 320, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    logits = llm.logits(ids)
    greedy = llm.generate([ids[:7], ids[:13]], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    if dist.get_rank() == 0:
        torch.save({"logits": logits, "greedy": [o.token_ids for o in greedy]}, args.out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
