"""Block manager and scheduler without a model: blocks are accounted for and always returned."""
import pytest

from lowbit.engine.block_manager import BlockManager
from lowbit.engine.scheduler import Scheduler
from lowbit.engine.sequence import Sequence, SequenceStatus
from lowbit.sampling_params import SamplingParams


def seq(n, max_tokens=8, **kw):
    return Sequence(list(range(1, n + 1)), SamplingParams(temperature=0, max_tokens=max_tokens, **kw))


def test_allocate_and_free_counts_blocks():
    bm = BlockManager(num_blocks=10, block_size=4)
    s = seq(9)  # 3 blocks
    assert bm.can_allocate(s)
    bm.allocate(s)
    assert len(s.block_table) == 3 and bm.num_free_blocks == 7
    assert len(set(s.block_table)) == 3
    bm.deallocate(s)
    assert bm.num_free_blocks == 10 and s.block_table == []


def test_append_takes_a_block_only_at_a_block_boundary():
    bm = BlockManager(num_blocks=3, block_size=4)
    s = seq(4)
    bm.allocate(s)  # 1 block holds tokens 0..3
    s.append_token(7)  # token 4 needs a second block when decoded
    assert bm.can_append(s)
    bm.may_append(s)
    assert len(s.block_table) == 2 and bm.num_free_blocks == 1
    s.append_token(8)  # token 5 fits block 2
    bm.may_append(s)
    assert len(s.block_table) == 2


def test_scheduler_prefills_then_decodes_and_frees_on_finish():
    bm = BlockManager(num_blocks=16, block_size=4)
    sch = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=64, max_model_len=64)
    a, b = seq(5, max_tokens=2), seq(3, max_tokens=3)
    sch.add(a)
    sch.add(b)
    batch, prefill = sch.schedule()
    assert prefill and batch == [a, b]
    sch.postprocess(batch, [11, 12], eos_token_ids={0})
    batch, prefill = sch.schedule()
    assert not prefill and batch == [a, b]
    finished = sch.postprocess(batch, [13, 14], eos_token_ids={0})
    assert finished == [a] and a.finish_reason == "length" and a.block_table == []
    batch, _ = sch.schedule()
    assert batch == [b]
    sch.postprocess(batch, [0], eos_token_ids={0})  # EOS
    assert b.finish_reason == "stop" and not sch.has_unfinished()
    assert bm.num_free_blocks == 16


def test_token_budget_and_max_num_seqs_limit_a_prefill():
    bm = BlockManager(num_blocks=64, block_size=4)
    sch = Scheduler(bm, max_num_seqs=2, max_num_batched_tokens=10, max_model_len=64)
    seqs = [seq(6), seq(6), seq(2)]
    for s in seqs:
        sch.add(s)
    batch, _ = sch.schedule()
    assert batch == [seqs[0]]  # a second 6-token prompt would pass the 10-token budget
    batch, _ = sch.schedule()
    assert batch == [seqs[1]]
    batch, prefill = sch.schedule()  # max_num_seqs=2 reached: decode
    assert not prefill and len(batch) == 2


def test_preemption_frees_blocks_and_resumes():
    bm = BlockManager(num_blocks=6, block_size=2)
    sch = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=64, max_model_len=12)
    a, b = seq(4, max_tokens=4), seq(4, max_tokens=4)  # 2 blocks each; each ends at 8 tokens = 4 blocks
    sch.add(a)
    sch.add(b)
    batch, _ = sch.schedule()
    for _ in range(2):  # tokens 5 and 6: the third blocks take the last free ones
        sch.postprocess(batch, [5, 5], eos_token_ids=set())
        batch, prefill = sch.schedule()
        assert not prefill and batch == [a, b]
    sch.postprocess(batch, [5, 5], eos_token_ids=set())
    batch, prefill = sch.schedule()  # token 7 of a needs a fourth block: b (the later one) is preempted
    assert not prefill and batch == [a]
    assert b.status == SequenceStatus.WAITING and b.block_table == [] and sch.num_preemptions == 1
    assert list(sch.waiting) == [b]
    while sch.has_unfinished():
        batch, _ = sch.schedule()
        sch.postprocess(batch, [5] * len(batch), eos_token_ids=set())
    assert a.num_output_tokens == 4 and b.num_output_tokens == 4
    assert bm.num_free_blocks == 6


def test_a_sequence_that_can_never_fit_raises_instead_of_spinning():
    sch = Scheduler(BlockManager(2, 2), 4, 64, max_model_len=64)
    s = seq(4, max_tokens=4)
    sch.add(s)
    batch, _ = sch.schedule()
    sch.postprocess(batch, [5], eos_token_ids=set())
    with pytest.raises(RuntimeError, match="needs 3 KV blocks"):
        sch.schedule()  # it preempts itself: 5 tokens need 3 blocks of 2 and the cache has 2


def test_abort_frees_waiting_and_running():
    bm = BlockManager(num_blocks=8, block_size=4)
    sch = Scheduler(bm, max_num_seqs=1, max_num_batched_tokens=64, max_model_len=64)
    a, b = seq(4), seq(4)
    sch.add(a)
    sch.add(b)
    sch.schedule()  # a runs, b waits (max_num_seqs=1)
    sch.finish(a, "abort")
    sch.finish(b, "abort")
    assert not sch.has_unfinished() and bm.num_free_blocks == 8
    assert a.finish_reason == b.finish_reason == "abort"


def test_prompt_longer_than_model_is_refused():
    sch = Scheduler(BlockManager(8, 4), 4, 64, max_model_len=16)
    with pytest.raises(ValueError, match="max_model_len"):
        sch.add(seq(17))


def test_reserve_next_takes_the_block_the_token_after_next_needs():
    bm = BlockManager(num_blocks=3, block_size=4)
    a, b = seq(3), seq(4)
    bm.allocate(a)
    bm.allocate(b)
    assert bm.reserve_next([a, b])  # a's index 3 is in its block; b's index 4 starts a new one
    assert len(a.block_table) == 1 and len(b.block_table) == 2 and bm.num_free_blocks == 0
    b.append_token(5)
    bm.may_append(b)  # the next step's slot is the one reserved: nothing more is taken
    assert len(b.block_table) == 2
    for t in (6, 7, 8):
        b.append_token(t)
    # b's index 8 needs a third block of its own and none is free: nothing is reserved, for any sequence
    assert not bm.reserve_next([a, b])
    assert len(a.block_table) == 1 and len(b.block_table) == 2 and bm.num_free_blocks == 0


def test_a_step_ahead_stays_valid_when_the_next_reservation_takes_a_block():
    """A decode step launched ahead is taken by the next call when its key matches (engine/cuda_graphs.py): the key
    holds the blocks the step reads and writes, not the one the next call reserves for its own step ahead at a block
    boundary (that one was in the key, and the step ahead was dropped and run again at every boundary)."""
    from lowbit.engine.cuda_graphs import _batch_key
    bm = BlockManager(num_blocks=4, block_size=4)
    s = seq(7)
    bm.allocate(s)  # indices 0..6 in two blocks; this step decodes index 6
    assert bm.reserve_next([s]) and len(s.block_table) == 2  # the step ahead's index 7 is in the second block
    launched = _batch_key([s], 1, 4)
    s.append_token(9)  # the host takes this step's token: the sequence is what the step ahead computed on
    assert bm.reserve_next([s]) and len(s.block_table) == 3  # the next step ahead's index 8 starts a third block
    assert _batch_key([s], 0, 4) == launched
    s.block_table[1] = 3  # a block the step read is another one (preempted, given others): not the same inputs
    assert _batch_key([s], 0, 4) != launched
