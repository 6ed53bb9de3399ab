"""The data side (:mod:`dist_sparse_attn.data`): embedded corpus, user files, split,
sampler, sequence sharding and the retrieval task, against the files' bytes, direct
counts and the layout the task defines."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from dist_sparse_attn.data import (TokenData, eval_retrieval, load_bin, load_text,
                                   retrieval_batch, shard_bounds, shard_sequence, stdlib_corpus,
                                   stdlib_files)


def test_stdlib_corpus_nonempty_deterministic_capped():
    files = stdlib_files()
    assert len(files) > 100 and all(f.endswith(".py") for f in files)
    assert not any("site-packages" in f for f in files)
    a = stdlib_corpus(max_bytes=300_000)
    b = stdlib_corpus(max_bytes=300_000)
    assert a.dtype == torch.int64 and a.shape == (300_000,)
    assert torch.equal(a, b)
    assert 0 <= int(a.min()) and int(a.max()) < 256
    with open(files[0], "rb") as f:     # starts with the first file's bytes
        head = f.read(100)
    assert bytes(a[:len(head)].to(torch.uint8).tolist()) == head
    assert torch.equal(stdlib_corpus(max_bytes=1000), a[:1000])


def test_load_text_and_bin(tmp_path, seed):
    p = tmp_path / "t.txt"
    p.write_bytes("héllo\n".encode())
    t = load_text(str(p))
    assert t.tolist() == list("héllo\n".encode())
    assert load_text(str(p), max_bytes=2).tolist() == list(b"h\xc3")
    ids = np.random.randint(0, 50_000, size=1000).astype(np.uint16)
    ids.tofile(tmp_path / "t.bin")
    m = load_bin(str(tmp_path / "t.bin"))
    assert np.array_equal(np.asarray(m), ids)
    data = TokenData(m, val_fraction=0.1)
    x, y = data.batch("train", 32, 4, torch.Generator().manual_seed(seed))
    assert x.dtype == torch.int64 and x.shape == (4, 32)
    assert torch.equal(x[:, 1:], y[:, :-1]) and int(x.max()) > 255


def test_split_sizes_and_batch_shift(seed):
    tokens = torch.arange(1000)
    data = TokenData(tokens, val_fraction=0.1)
    assert len(data.splits["train"]) == 900 and len(data.splits["val"]) == 100
    assert len(data) == 1000
    gen = torch.Generator().manual_seed(seed)
    x, y = data.batch("val", 16, 8, gen)
    assert x.shape == y.shape == (8, 16)
    assert torch.equal(y, x + 1)            # arange: next token = token + 1
    assert int(x.min()) >= 900              # val windows come from the val split only
    x, y = data.batch("train", 64, 8, gen)
    assert int(y.max()) < 900
    a = data.batch("train", 64, 8, torch.Generator().manual_seed(seed + 1))
    b = data.batch("train", 64, 8, torch.Generator().manual_seed(seed + 1))
    assert torch.equal(a[0], b[0])
    with pytest.raises(ValueError, match="split"):
        data.batch("test", 16, 1)
    with pytest.raises(ValueError, match="seq_len"):
        data.batch("val", 100, 1)


@pytest.mark.parametrize("n,world", [(12, 3), (13, 3), (7, 4), (5, 5), (257, 2)])
def test_shard_sequence_covers_once(n, world):
    x = torch.randn(2, n, 3)
    shards = [shard_sequence(x, r, world) for r in range(world)]
    assert torch.equal(torch.cat([s for s, _ in shards], dim=1), x)
    pos = torch.cat([p for _, p in shards])
    assert torch.equal(pos, torch.arange(n))
    lengths = [s.shape[1] for s, _ in shards]
    assert max(lengths) - min(lengths) <= 1 and min(lengths) >= 1
    assert lengths == sorted(lengths, reverse=True)     # the extra tokens go to the low ranks
    for r, (s, p) in enumerate(shards):
        lo, hi = shard_bounds(n, r, world)
        assert torch.equal(s, x[:, lo:hi]) and p.tolist() == list(range(lo, hi))
    # labels sharded the same way as inputs stay aligned
    y = torch.arange(n)[None]
    assert torch.equal(shard_sequence(y, 1, world)[0], y[:, shard_bounds(n, 1, world)[0]:
                                                          shard_bounds(n, 1, world)[1]])


def test_shard_errors():
    with pytest.raises(ValueError, match="tokens"):
        shard_sequence(torch.zeros(1, 3), 0, 4)
    with pytest.raises(ValueError, match="rank"):
        shard_sequence(torch.zeros(1, 8), 4, 4)


def test_retrieval_task_layout(seed):
    gen = torch.Generator().manual_seed(seed)
    N, key_len = 512, 3
    x, value, plant = retrieval_batch(32, N, gen, key_len=key_len, max_depth=0.25)
    assert x.shape == (32, N) and x.dtype == torch.int64
    assert int(plant.max()) < N // 4       # planted far back: in the first quarter
    for b in range(32):
        p = int(plant[b])
        text = bytes(x[b].tolist())
        key = text[p + 1:p + 1 + key_len]
        assert text[p:p + 1] == b"|" and key.isupper()
        assert text[p + 1 + key_len:p + 2 + key_len] == b"="
        assert text[p + 2 + key_len] == int(value[b]) and chr(int(value[b])).isdigit()
        assert text.endswith(b"|" + key + b"=")
        assert text.count(b"|") == 2           # filler never contains the marker
        assert N - (p + 2 + key_len) > N // 2  # the answer is more than N/2 tokens back


def test_eval_retrieval_runs(seed):
    class Oracle(torch.nn.Module):
        """Looks the key up in its own input: accuracy 1."""
        def forward(self, x):
            logits = torch.zeros(*x.shape, 256)
            for b in range(x.shape[0]):
                p = x[b].tolist().index(ord("|"))
                logits[b, -1, x[b, p + 5]] = 1.0      # key_len=3: "|KEY=v"
            return logits, None

    class Constant(torch.nn.Module):
        def forward(self, x):
            logits = torch.zeros(*x.shape, 256)
            logits[..., ord("0")] = 1.0
            return logits, None

    gen = torch.Generator().manual_seed(seed)
    assert eval_retrieval(Oracle(), n_samples=20, seq_len=128, batch_size=8, generator=gen) == 1.0
    acc = eval_retrieval(Constant(), n_samples=200, seq_len=64, batch_size=64, generator=gen)
    assert 0.0 < acc < 0.3    # chance is 1/10


def test_eval_retrieval_sequence_parallel_shards(seed):
    """shard=(rank, world): each rank runs its contiguous shard of the same sequences with
    their global positions (and the extra forward arguments); the last rank returns the
    accuracy of the whole-sequence run, the others None."""
    calls = []

    class LastToken(torch.nn.Module):
        """Predicts the digit (last token - ord('A')) % 10: depends on the last position only."""
        def forward(self, x, positions=None, tag=None):
            calls.append((x.clone(), positions, tag))
            logits = torch.zeros(*x.shape, 256)
            logits[:, -1, ord("0") + (x[:, -1] - ord("A")) % 10] = 1.0
            return logits, None

    model = LastToken()
    n, L, world = 13, 61, 3
    whole = eval_retrieval(model, n_samples=n, seq_len=L, batch_size=5,
                           generator=torch.Generator().manual_seed(seed))
    full = [c[0] for c in calls]
    assert [c[1] for c in calls] == [None] * 3
    # the accuracy counted here: the same sequences (batches of 5, 5, 3), the model's rule
    gen = torch.Generator().manual_seed(seed)
    correct = 0
    for size in (5, 5, 3):
        x, value, _ = retrieval_batch(size, L, gen)
        correct += int((ord("0") + (x[:, -1] - ord("A")) % 10 == value).sum())
    assert whole == correct / n, (whole, correct)
    for rank in range(world):
        calls.clear()
        acc = eval_retrieval(model, n_samples=n, seq_len=L, batch_size=5,
                             generator=torch.Generator().manual_seed(seed), shard=(rank, world),
                             forward_kwargs={"tag": "sp"})
        lo, hi = shard_bounds(L, rank, world)
        assert len(calls) == 3
        for (x, pos, tag), ref in zip(calls, full):
            assert torch.equal(x, ref[:, lo:hi]) and tag == "sp"
            assert pos.tolist() == list(range(lo, hi))
        assert acc == (whole if rank == world - 1 else None), (rank, acc, whole)
    assert model.training       # eval() is undone


def test_train_batch_retrieval_rows_target_the_answer(seed):
    """train.retrieval_mix: a retrieval row of a training batch is a retrieval sequence
    that ends with the question "|KEY=", and its last target is the planted digit (the
    answer :func:`eval_retrieval` scores), so the model is trained on the task; the other
    targets are the next tokens."""
    from dist_sparse_attn.config import TrainConfig
    from dist_sparse_attn.data import train_batch
    data = TokenData(torch.randint(97, 123, (5000,)))
    tcfg = TrainConfig(seq_len=40, micro_batch=8, retrieval_mix=0.5, seed=seed)
    rows = 0
    for step in range(4):
        x, y = train_batch(data, tcfg, step, 0, 0)
        assert x.shape == y.shape == (8, 40)
        for b in range(8):
            text = bytes(x[b].tolist())
            if b"|" not in text:           # a corpus row
                continue
            rows += 1
            p = text.index(b"|")
            key = text[p + 1:p + 4]
            assert text.endswith(b"|" + key + b"="), text
            assert int(y[b, -1]) == text[p + 5], (text, bytes(y[b].tolist()))
            assert torch.equal(y[b, :-1], x[b, 1:])
    assert rows > 0
