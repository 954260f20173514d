"""gather_rollout on 2 real gloo processes: shards with different prompt and completion widths come
back as one global batch, re-padded on both sides, in process order, with every per-row tensor."""
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from vrpo_fast.distributed import pad_columns
from vrpo_fast.rollout import Rollout

PAD = 0


def _shard(rank):
    """Rank 0: 2 rows, prompt width 3, completion width 2; rank 1: 2 rows, prompt 5, completion 4."""
    P, C = (3, 2) if rank == 0 else (5, 4)
    g = torch.Generator().manual_seed(rank)
    ids = torch.randint(1, 50, (2, P + C), generator=g)
    attn = torch.ones(2, P + C, dtype=torch.long)
    attn[0, :1] = 0  # left padding in the prompt
    ids[0, :1] = PAD
    resp = torch.zeros(2, P + C, dtype=torch.bool)
    resp[:, P:] = True
    resp[1, -1] = False  # a shorter completion, right-padded
    attn[1, -1] = 0
    ids[1, -1] = PAD
    lp = torch.randn(2, P + C, generator=g, dtype=torch.float64)
    per_seq = torch.tensor([10.0 * rank, 10.0 * rank + 1])
    return Rollout(ids, attn, resp, P, [f"r{rank}a", f"r{rank}b"]), {"lp": lp, "seq": per_seq}


def _worker(rank, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2")
    from accelerate import Accelerator

    from vrpo_fast.distributed import gather_rollout

    acc = Accelerator(cpu=True)
    rollout, tensors = _shard(rank)
    merged, out = gather_rollout(acc, rollout, tensors, pad_token_id=PAD)
    torch.save({"merged": merged, "out": out}, os.path.join(out_dir, f"rank{rank}.pt"))
    acc.wait_for_everyone()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_gather_rollout_repads_and_concatenates_in_process_order(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    # expected, built by hand: widest prompt 5 and completion 4 -> rank 0 gets 2 columns on the left
    # and 2 on the right
    (r0, t0), (r1, t1) = _shard(0), _shard(1)
    ids = torch.cat([pad_columns(r0.input_ids, 2, 2, PAD), r1.input_ids])
    attn = torch.cat([pad_columns(r0.attention_mask, 2, 2), r1.attention_mask])
    resp = torch.cat([pad_columns(r0.response_mask, 2, 2), r1.response_mask])
    lp = torch.cat([pad_columns(t0["lp"], 2, 2), t1["lp"]])
    for res in results:  # every process holds the same global batch
        m, out = res["merged"], res["out"]
        assert m.prompt_length == 5 and m.completions == ["r0a", "r0b", "r1a", "r1b"]
        assert torch.equal(m.input_ids, ids) and torch.equal(m.attention_mask, attn)
        assert m.response_mask.dtype == torch.bool and torch.equal(m.response_mask, resp)
        assert out["lp"].dtype == torch.float64 and torch.equal(out["lp"], lp)
        assert out["seq"].tolist() == [0.0, 1.0, 10.0, 11.0]
        # the state-aligned mask moved with the tokens: it still marks each response token's state
        assert torch.equal(m.action_mask[:2, 2:-2], r0.action_mask) and torch.equal(m.action_mask[2:], r1.action_mask)
        assert not m.action_mask[:2, :2].any() and not m.action_mask[:2, -2:].any()


def test_gather_rollout_single_process_is_identity():
    from vrpo_fast.distributed import gather_rollout

    class One:
        num_processes = 1

    rollout, tensors = _shard(1)
    merged, out = gather_rollout(One(), rollout, tensors, pad_token_id=PAD)
    assert merged is rollout and out == tensors


def test_pad_columns_keeps_dtype():
    m = torch.tensor([[True, False]])
    assert pad_columns(m, 1, 2).tolist() == [[False, True, False, False, False]]
    assert pad_columns(torch.tensor([[3, 4]]), 2, 0, value=9).tolist() == [[9, 9, 3, 4]]
