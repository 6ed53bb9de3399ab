"""Byte-level data for the GPT of :mod:`dist_sparse_attn.model`.

* :func:`stdlib_corpus`: a corpus present on every machine without a download:
  the Python standard library's own ``*.py`` sources, sorted by relative path,
  read as bytes and concatenated (deterministic for a given Python version).
* :func:`load_text` (any file, as bytes) and :func:`load_bin` (a nanoGPT-style
  ``.bin`` of uint16 token ids, memory-mapped) for user data.
* :class:`TokenData`: a train/val split by fraction and a random-window sampler.
* :func:`shard_sequence`: sequence sharding of inputs/labels for sequence
  parallelism, done in one place, with the shards' global positions.
* :func:`retrieval_batch` / :func:`eval_retrieval`: a synthetic long-range
  retrieval task (a key/value pair planted far back, the key asked at the end),
  evaluated on one device or sequence-parallel.
* :func:`load_data`, :func:`train_batch`, :func:`val_batch`: the training run's corpus
  and batches, a function of the configuration and the step (exact resume).
"""
from __future__ import annotations

import os

import numpy as np
import torch

from .config import ConfigError, find_file

# ---------------------------------------------------------------------------------------------
# corpora
# ---------------------------------------------------------------------------------------------

_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}


def stdlib_files() -> list[str]:
    """Paths of the standard library's ``*.py`` files, sorted by path relative to the
    stdlib directory (third-party ``site-packages``/``dist-packages`` excluded)."""
    root = os.path.dirname(os.__file__)
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS]
        out += [os.path.relpath(os.path.join(dirpath, f), root)
                for f in filenames if f.endswith(".py")]
    return [os.path.join(root, p) for p in sorted(out)]


def stdlib_corpus(max_bytes: int = 4_000_000) -> torch.Tensor:
    """The first ``max_bytes`` bytes of the concatenated stdlib sources (:func:`stdlib_files`)
    as byte tokens, (n,) int64 in [0, 256)."""
    if max_bytes < 1:
        raise ValueError(f"max_bytes must be positive, got {max_bytes}")
    chunks, total = [], 0
    for path in stdlib_files():
        with open(path, "rb") as f:
            data = f.read(max_bytes - total)
        chunks.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    return bytes_to_tokens(b"".join(chunks))


def bytes_to_tokens(data: bytes) -> torch.Tensor:
    """bytes -> (n,) int64 tokens (uint8 values)."""
    return torch.from_numpy(np.frombuffer(data, dtype=np.uint8).astype(np.int64))


def load_text(path: str, max_bytes: int | None = None) -> torch.Tensor:
    """Any file read as bytes (up to ``max_bytes``) -> (n,) int64 byte tokens."""
    with open(path, "rb") as f:
        return bytes_to_tokens(f.read() if max_bytes is None else f.read(max_bytes))


def load_bin(path: str, dtype=np.uint16) -> np.memmap:
    """A nanoGPT-style token file (raw ``dtype`` ids, no header), memory-mapped read-only.
    :class:`TokenData` samples windows from it without loading it."""
    return np.memmap(path, dtype=dtype, mode="r")


# ---------------------------------------------------------------------------------------------
# split and sampling
# ---------------------------------------------------------------------------------------------

class TokenData:
    """A token stream split into train (first ``1 - val_fraction``) and val (the rest).

    tokens: (n,) torch integer tensor or numpy array / memmap.
    """

    def __init__(self, tokens, val_fraction: float = 0.1):
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        n = len(tokens)
        n_train = n - int(n * val_fraction)
        self.splits = {"train": tokens[:n_train], "val": tokens[n_train:]}

    def __len__(self):
        return sum(len(s) for s in self.splits.values())

    def batch(self, split: str, seq_len: int, batch_size: int,
              generator: torch.Generator | None = None, device=None):
        """``batch_size`` random windows of ``split``: x (B, seq_len) int64 and y = x shifted
        by one token (y[:, t] is the token after x[:, t])."""
        if split not in self.splits:
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        data = self.splits[split]
        if len(data) < seq_len + 1:
            raise ValueError(f"split {split!r} has {len(data)} tokens, fewer than "
                             f"seq_len + 1 = {seq_len + 1}")
        starts = torch.randint(0, len(data) - seq_len, (batch_size,), generator=generator)
        rows = [data[s:s + seq_len + 1] for s in starts.tolist()]
        if isinstance(data, torch.Tensor):
            xy = torch.stack(rows).long()                                      # (B, seq_len + 1)
        else:
            xy = torch.from_numpy(np.stack(rows).astype(np.int64))
        x, y = xy[:, :-1], xy[:, 1:]                                           # (B, seq_len)
        if device is not None:
            x, y = x.to(device), y.to(device)
        return x.contiguous(), y.contiguous()


# ---------------------------------------------------------------------------------------------
# sequence sharding
# ---------------------------------------------------------------------------------------------

def shard_bounds(n: int, rank: int, world: int) -> tuple[int, int]:
    """[lo, hi) of rank's contiguous shard of n tokens: the first ``n % world`` ranks
    get ``n // world + 1`` tokens, the others ``n // world`` (``torch.tensor_split``'s
    rule); every rank gets at least one token, so n >= world."""
    if not 0 <= rank < world:
        raise ValueError(f"rank must be in [0, world={world}), got {rank}")
    if n < world:
        raise ValueError(f"cannot shard {n} tokens over {world} ranks: each needs one")
    base, extra = divmod(n, world)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (rank < extra)


def shard_sequence(x: torch.Tensor, rank: int, world: int, dim: int = 1):
    """This rank's contiguous shard of x along ``dim`` (the sequence) and its global positions.

    Apply the same call to inputs and labels. Returns (x_shard, positions (n_r,) int64),
    the positions to pass to ``GPT.forward(..., positions=...)``; rule in :func:`shard_bounds`.
    """
    lo, hi = shard_bounds(x.shape[dim], rank, world)
    return x.narrow(dim, lo, hi - lo), torch.arange(lo, hi, device=x.device)


# ---------------------------------------------------------------------------------------------
# synthetic long-range retrieval
# ---------------------------------------------------------------------------------------------

FILLER = torch.tensor(list(b"abcdefghijklmnopqrstuvwxyz "))
KEY_ALPHABET = torch.tensor(list(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ"))
VALUE_ALPHABET = torch.tensor(list(b"0123456789"))
MARK, EQ = ord("|"), ord("=")


def retrieval_batch(batch_size: int, seq_len: int, generator: torch.Generator | None = None,
                    key_len: int = 3, max_depth: float = 0.25):
    """Synthetic retrieval sequences, byte tokens.

    Each row is lowercase filler with ``|KEY=v`` planted in its first ``max_depth``
    fraction and ``|KEY=`` at the very end; the answer is the digit v, to be
    predicted from the last position's logits. KEY is ``key_len`` uppercase letters.

    Returns x (B, seq_len) int64, value (B,) int64 (the byte of the digit) and
    plant (B,) int64, the index of the planted '|'.
    """
    tail = key_len + 2                     # "|KEY="
    planted = key_len + 3                  # "|KEY=v"
    if seq_len < planted + tail + 1:
        raise ValueError(f"seq_len must be at least {planted + tail + 1} for key_len={key_len}")
    g = generator
    x = FILLER[torch.randint(0, len(FILLER), (batch_size, seq_len), generator=g)]  # (B, N)
    keys = KEY_ALPHABET[torch.randint(0, len(KEY_ALPHABET), (batch_size, key_len),
                                      generator=g)]                            # (B, key_len)
    value = VALUE_ALPHABET[torch.randint(0, len(VALUE_ALPHABET), (batch_size,), generator=g)]
    last = max(1, min(int(seq_len * max_depth), seq_len - tail - planted))
    plant = torch.randint(0, last, (batch_size,), generator=g)
    for b in range(batch_size):
        p = int(plant[b])
        x[b, p] = MARK
        x[b, p + 1:p + 1 + key_len] = keys[b]
        x[b, p + 1 + key_len] = EQ
        x[b, p + 2 + key_len] = value[b]
        x[b, -tail] = MARK
        x[b, -tail + 1:-1] = keys[b]
        x[b, -1] = EQ
    return x, value, plant


@torch.no_grad()
def eval_retrieval(model, n_samples: int = 64, seq_len: int = 256, batch_size: int = 16,
                   generator: torch.Generator | None = None, device=None, *, shard=(0, 1),
                   forward_kwargs: dict | None = None, **task) -> float | None:
    """Accuracy of ``model`` on :func:`retrieval_batch`: the argmax of the last position's
    logits (``model(x)[0][:, -1]``) equals the planted value. ``task``: key_len, max_depth.

    ``shard = (rank, world)``: sequence parallelism. Every rank draws the same sequences
    (give each the same ``generator`` state) and runs its contiguous shard of them
    (:func:`shard_bounds`) with their global positions, ``model(x_shard, positions=...)``;
    the rank holding the last position (``world - 1``) returns the accuracy, the others
    None. ``forward_kwargs``: extra keyword arguments of every forward call.
    """
    rank, world = shard
    lo, hi = shard_bounds(seq_len, rank, world)
    kwargs = dict(forward_kwargs or {})
    if world > 1:
        kwargs["positions"] = torch.arange(lo, hi, device=device)
    was_training = model.training
    model.eval()
    correct = done = 0
    try:
        while done < n_samples:
            b = min(batch_size, n_samples - done)
            x, value, _ = retrieval_batch(b, seq_len, generator, **task)
            if device is not None:
                x, value = x.to(device), value.to(device)
            logits = model(x[:, lo:hi], **kwargs)[0]                          # (b, n_r, V)
            correct += int((logits[:, -1].argmax(-1) == value).sum())
            done += b
    finally:
        model.train(was_training)
    return correct / n_samples if rank == world - 1 else None


# ---------------------------------------------------------------------------------------------
# the training run's data
# ---------------------------------------------------------------------------------------------

def load_tokens(tcfg):
    """The corpus of ``train.data`` (:class:`~dist_sparse_attn.config.TrainConfig`):
    "stdlib", a text file (bytes, up to ``train.max_bytes``) or a uint16 ``.bin``;
    relative paths as :func:`~dist_sparse_attn.config.find_file` resolves them."""
    if tcfg.data == "stdlib":
        return stdlib_corpus(tcfg.max_bytes)
    path = find_file(tcfg.data)
    if not os.path.exists(path):
        raise ConfigError(f"train.data: no file {tcfg.data!r} (use 'stdlib', a text file or a .bin)")
    if os.path.isdir(path):
        raise ConfigError(f"train.data {tcfg.data!r} is a directory (use 'stdlib', a text file "
                          "or a .bin)")
    try:
        if path.endswith(".bin"):
            if os.path.getsize(path) % 2:
                raise ConfigError(f"train.data {tcfg.data!r}: a .bin holds uint16 token ids, "
                                  f"but its size ({os.path.getsize(path)} bytes) is odd")
            return load_bin(path)
        return load_text(path, tcfg.max_bytes)
    except OSError as e:
        raise ConfigError(f"train.data {tcfg.data!r}: cannot read it ({e.strerror})") from None


def load_data(tcfg) -> TokenData:
    """The corpus split into train and val (``train.val_fraction``); ConfigError when a
    split cannot hold one sequence (the same result on every rank: the same files)."""
    tokens = load_tokens(tcfg)
    if len(tokens) < 2:
        raise ConfigError(f"train.data {tcfg.data!r} has {len(tokens)} tokens")
    data = TokenData(tokens, tcfg.val_fraction)
    for split in ("train", "val"):
        n = len(data.splits[split])
        if n < tcfg.seq_len + 1:
            raise ConfigError(f"the {split} split has {n} tokens, fewer than seq_len + 1 = "
                              f"{tcfg.seq_len + 1}: use more data (train.max_bytes), a shorter "
                              "train.seq_len or another train.val_fraction")
    return data


def sampled_tokens(data: TokenData, samples: int = 4096) -> dict:
    """Split name -> int64 array of ``samples`` of its tokens at evenly spaced indices
    (cheap on a large memory-mapped ``.bin``)."""
    out = {}
    for split in ("train", "val"):
        tokens = data.splits[split]
        idx = np.unique(np.linspace(0, len(tokens) - 1,
                                    num=min(samples, len(tokens))).astype(np.int64))
        picked = tokens[torch.from_numpy(idx)] if isinstance(tokens, torch.Tensor) \
            else tokens[idx]
        out[split] = np.asarray(picked, dtype=np.int64)
    return out


def data_fingerprint(data: TokenData, samples: int = 4096) -> tuple:
    """What the ranks of a run compare to know they read the same corpus: the splits'
    lengths and a SHA-256 of :func:`sampled_tokens`."""
    import hashlib
    out = []
    for split, values in sampled_tokens(data, samples).items():
        out += [len(data.splits[split]), hashlib.sha256(values.tobytes()).hexdigest()]
    return tuple(out)


def check_vocab(data: TokenData, vocab_size: int, what: str, samples: int = 4096):
    """ConfigError when :func:`sampled_tokens` hold an id the model has no embedding for
    (``vocab_size``): a tokenizer's ``.bin`` with a byte-level vocabulary, or a ``.bin``
    that is not uint16. A sample, not every token: a clear error for a mismatch of the
    two, before the first step fails inside the embedding (a device assert on CUDA)."""
    top = max(int(v.max()) for v in sampled_tokens(data, samples).values() if v.size)
    if top >= vocab_size:
        raise ConfigError(f"train.data {what!r} holds token id {top}, but model.vocab_size is "
                          f"{vocab_size}: set model.vocab_size to the vocabulary of the data's "
                          "tokenizer (a .bin holds uint16 ids)")


def seeded_generator(*key) -> torch.Generator:
    """A CPU generator seeded by a tuple of ints (stable across runs and processes)."""
    h = 1469598103934665603
    for k in key:
        h = ((h ^ (int(k) & 0xFFFFFFFFFFFF)) * 1099511628211) & 0xFFFFFFFFFFFFFFFF
    return torch.Generator().manual_seed(h & 0x7FFFFFFFFFFFFFFF)


def train_batch(data: TokenData, tcfg, step: int, micro: int, dp_rank: int):
    """Micro-batch ``micro`` of optimizer step ``step`` for data-parallel rank ``dp_rank``:
    x, y (micro_batch, seq_len) int64 on the CPU, the same on every rank of a
    sequence-parallel group, a function of (seed, step, micro, dp_rank) only (exact
    resume). A ``train.retrieval_mix`` fraction of the rows are retrieval sequences of
    seq_len tokens (:func:`retrieval_batch`, ending with the question "|KEY="): their
    targets are the next tokens, and the last one is the planted digit, the answer
    :func:`eval_retrieval` scores."""
    g = seeded_generator(tcfg.seed, 1, step, micro, dp_rank)
    x, y = data.batch("train", tcfg.seq_len, tcfg.micro_batch, generator=g)
    if tcfg.retrieval_mix > 0:
        swap = torch.rand(tcfg.micro_batch, generator=g) < tcfg.retrieval_mix
        if swap.any():
            r, value, _ = retrieval_batch(int(swap.sum()), tcfg.seq_len, generator=g)
            x[swap], y[swap] = r, torch.cat([r[:, 1:], value[:, None]], 1)
    return x, y


def val_batch(data: TokenData, tcfg, i: int, dp_rank: int):
    """Validation batch ``i`` of data-parallel rank ``dp_rank`` (the same at every eval)."""
    g = seeded_generator(tcfg.seed, 2, i, dp_rank)
    return data.batch("val", tcfg.seq_len, tcfg.micro_batch, generator=g)


__all__ = ["stdlib_files", "stdlib_corpus", "bytes_to_tokens", "load_text", "load_bin",
           "TokenData", "shard_bounds", "shard_sequence", "retrieval_batch", "eval_retrieval",
           "load_tokens", "load_data", "sampled_tokens", "data_fingerprint", "check_vocab",
           "seeded_generator", "train_batch", "val_batch"]
