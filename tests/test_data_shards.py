"""The streaming split: every sample exactly once per pass across ranks x workers (also when slots outnumber
shards), equal endless streams per rank, and exact positioning for resume."""

from __future__ import annotations

import collections

import pytest

from trainer.data.shards import ShardStream, StreamLayout, iter_raw, make_loader, split_range
from visalign.config import ConfigError
from visalign.shards import iter_tar, read_manifest


def all_ids(root):
    manifest = read_manifest(root)
    return [s["meta"]["id"] for p in manifest.shard_paths(root) for s in iter_tar(p)]


def first_pass_ids(stream: ShardStream, slot: int) -> list[str]:
    """Ids a slot emits in pass 0 (read directly from the slot stream, no batching)."""
    start, stop = stream.slot_range(slot)
    out = []
    for s in stream.iter_slot(slot):
        assert s["slot"] == slot
        if s["pass"] > 0:
            break
        out.append(s["meta"]["id"])
    assert len(out) == stop - start
    return out


def test_split_range_partitions_at_sample_granularity():
    for num_samples in range(1, 30):
        for num_slots in range(1, num_samples + 1):
            ranges = [split_range(num_samples, num_slots, s) for s in range(num_slots)]
            covered = [i for a, b in ranges for i in range(a, b)]
            assert covered == list(range(num_samples))  # disjoint, complete, in order
            sizes = [b - a for a, b in ranges]
            assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1
    with pytest.raises(ConfigError, match="lower --num-workers"):
        split_range(3, 4, 0)


def test_iter_raw_reads_a_sample_window(tiny_shards):
    root = tiny_shards(num_samples=5, samples_per_shard=5)
    path = read_manifest(root).shard_paths(root)[0]
    assert [r["__key__"] for r in iter_raw(path, 1, 4)] == ["s0001", "s0002", "s0003"]
    assert [r["__key__"] for r in iter_raw(path)] == [f"s{i:04d}" for i in range(5)]


@pytest.mark.parametrize("world_size,num_workers", [(2, 3), (1, 1), (3, 1), (2, 2)])
def test_every_sample_exactly_once_per_pass_with_more_slots_than_shards(tiny_shards, world_size, num_workers):
    # 3 shards of uneven size (3, 3, 1) and up to 6 slots: every slot gets samples, no sample twice
    root = tiny_shards(num_samples=7, samples_per_shard=3)
    seen = collections.Counter()
    for rank in range(world_size):
        layout = StreamLayout(world_size, rank, num_workers, batch_size=2, seed=3, shuffle_buffer=4)
        stream = ShardStream(root, layout)
        for w in range(max(num_workers, 1)):
            seen.update(first_pass_ids(stream, stream.slot_of(w)))
    assert sorted(seen) == sorted(all_ids(root)) and set(seen.values()) == {1}


def test_passes_reshuffle_and_each_pass_is_complete(tiny_shards):
    root = tiny_shards(num_samples=7, samples_per_shard=3)
    stream = ShardStream(root, StreamLayout(1, 0, 0, batch_size=1, seed=0, shuffle_buffer=8))
    it = stream.iter_slot(0)
    passes = [[next(it)["meta"]["id"] for _ in range(7)] for _ in range(3)]
    assert all(sorted(p) == sorted(all_ids(root)) for p in passes)
    assert len({tuple(p) for p in passes}) > 1  # a fresh order per pass


def test_ranks_get_equal_endless_batches_through_workers(tiny_shards):
    """2 ranks x 3 workers over 3 shards: each rank's DataLoader yields as many batches as asked (no hang,
    same count per rank), and the first pass of every slot is disjoint and complete."""
    root = tiny_shards(num_samples=12, samples_per_shard=4)
    num_steps = 6  # 12 samples / 6 slots; batch_size 1 -> 6 batches = one pass per rank
    seen = collections.Counter()
    for rank in range(2):
        stream = ShardStream(root, StreamLayout(2, rank, 3, batch_size=1, seed=1, shuffle_buffer=2))
        batches = []
        for batch in make_loader(stream):
            batches.append(batch)
            if len(batches) == num_steps + 3:
                break
        assert len(batches) == num_steps + 3  # endless: it went on into the next pass
        first = batches[:num_steps]
        assert [b[0]["slot"] for b in first] == [rank * 3 + i % 3 for i in range(num_steps)]  # round-robin
        assert all(b[0]["pass"] == 0 for b in first) and all(b[0]["pass"] == 1 for b in batches[num_steps:])
        seen.update(b[0]["meta"]["id"] for b in first)
    assert sorted(seen) == sorted(all_ids(root)) and set(seen.values()) == {1}


@pytest.mark.parametrize("num_workers", [0, 2])
def test_start_batches_resumes_the_exact_stream(tiny_shards, num_workers):
    root = tiny_shards(num_samples=9, samples_per_shard=4)

    def take(start, n):
        layout = StreamLayout(1, 0, num_workers, batch_size=2, seed=5, shuffle_buffer=3)
        out = []
        for batch in make_loader(ShardStream(root, layout, start_batches=start)):
            out.append([(s["meta"]["id"], s["pass"]) for s in batch])
            if len(out) == n:
                return out

    whole = take(0, 12)
    for start in (1, 5, 7):
        assert take(start, 12 - start) == whole[start:]


def test_position_reports_pass_and_consumed_per_slot(tiny_shards):
    root = tiny_shards(num_samples=7, samples_per_shard=3)
    stream = ShardStream(root, StreamLayout(2, 1, 2, batch_size=2, seed=0, shuffle_buffer=1))
    # rank 1 owns slots 2 (samples 3..4 -> 2 per pass) and 3 (5..6 -> 2 per pass); 5 batches: w0 gets 3, w1 2
    assert stream.position(5) == {
        "2": {"pass": 3, "consumed": 0, "samples_per_pass": 2},
        "3": {"pass": 2, "consumed": 0, "samples_per_pass": 2},
    }
