"""KV cache: slot policies, sizes, the early-exit fallback against a slow reference, bookkeeping and masks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from loopformer.errors import InputError
from loopformer.inference.cache import KVCache, SlotPolicy, cache_bytes, parse_slot_policy
from support import small_config

# a config with 2 KV heads of width 8, layers 1/2/1: small enough for a Python triple loop
CONFIG = small_config(n_kv_heads=2)
MAX_STEPS = 6


# ----- policies ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("full", SlotPolicy("full")),
        ("last", SlotPolicy("last")),
        ("ring:4", SlotPolicy("ring", 4)),
        (" RING:1 ", SlotPolicy("ring", 1)),
        ("Full", SlotPolicy("full")),
    ],
)
def test_parse_slot_policy(text: str, expected: SlotPolicy) -> None:
    policy = parse_slot_policy(text)
    assert policy == expected
    assert parse_slot_policy(policy.label) == policy  # the label round-trips
    assert parse_slot_policy(policy) is policy


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("ring", "unknown KV slot policy 'ring'"),
        ("ring:0", "ring size of a KV slot policy must be an integer >= 1"),
        ("ring:-2", "ring size"),
        ("ring:x", "integer ring size"),
        ("ring:", "integer ring size"),
        ("ring:2.5", "integer ring size"),
        ("ring:99999999999999999999", "above 1,000,000"),
        ("ring:1000001", "above 1,000,000"),
        ("foo", "unknown KV slot policy 'foo'"),
        ("last:2", "unknown KV slot policy 'last:2'"),
        ("full:3", "unknown KV slot policy 'full:3'"),
        ("", "unknown KV slot policy"),
    ],
)
def test_parse_slot_policy_errors(text: str, fragment: str) -> None:
    with pytest.raises(InputError) as info:
        parse_slot_policy(text)
    message = str(info.value)
    assert fragment in message and "\n" not in message  # one sentence that says what was wrong
    assert repr(text) in message or "got 0" in message


@pytest.mark.parametrize("kwargs", [{"kind": "lru"}, {"kind": "ring", "size": 0}, {"kind": "ring", "size": True}])
def test_slot_policy_validation(kwargs: dict) -> None:
    with pytest.raises(InputError):
        SlotPolicy(**kwargs)


@pytest.mark.parametrize(
    ("text", "slots", "expected"),
    [
        ("full", 7, [0, 1, 2, 3, 4, 5, 6]),
        ("ring:3", 3, [0, 1, 2, 0, 1, 2, 0]),
        ("ring:1", 1, [0] * 7),
        ("ring:8", 7, [0, 1, 2, 3, 4, 5, 6]),  # a ring larger than the depth is the full cache
        ("ring:1000000", 7, [0, 1, 2, 3, 4, 5, 6]),
        ("last", 1, [0] * 7),
    ],
)
def test_slot_mapping(text: str, slots: int, expected: list[int]) -> None:
    policy = parse_slot_policy(text)
    assert policy.slots(7) == slots
    assert [policy.slot(i) for i in range(7)] == expected
    iterations = torch.tensor([[0, 1, 2, 3], [4, 5, 6, 6]])
    assert policy.slot_of(iterations).tolist() == [[expected[i] for i in row] for row in iterations.tolist()]
    assert all(0 <= s < slots for s in expected)


def test_a_ring_larger_than_the_depth_allocates_no_more_than_the_full_cache() -> None:
    config = small_config()
    full = KVCache(config, 1, 4, "full", max_loops=4)
    assert KVCache(config, 1, 4, "ring:1000000", max_loops=4).nbytes() == full.nbytes()
    assert cache_bytes(config, "ring:1000", 4, 4) == cache_bytes(config, "full", 4, 4)


@pytest.mark.parametrize("text", ["full", "ring:4", "ring:2", "last"])
@pytest.mark.parametrize("batch", [1, 3])
def test_cache_bytes_matches_the_allocation(text: str, batch: int) -> None:
    config = small_config(n_kv_heads=2, n_core=3)
    cache = KVCache(config, batch, 11, text, max_loops=5)
    assert cache_bytes(config, text, 11, 5, batch_size=batch) == cache.nbytes()
    half = KVCache(config, batch, 11, text, max_loops=5, dtype=torch.float16)
    assert cache_bytes(config, text, 11, 5, batch_size=batch, element_bytes=2) == half.nbytes()
    core_k, core_v = cache.store["core"]
    assert core_k.shape == (3, parse_slot_policy(text).slots(5), batch, 2, 11, config.head_dim) == core_v.shape


def test_cache_bytes_ratio_follows_the_layer_count() -> None:
    config = small_config()  # prelude 1, core 2, coda 1
    full = cache_bytes(config, "full", 100, 32)
    # prelude + coda + core x slots layers hold keys and values
    assert full / cache_bytes(config, "ring:4", 100, 32) == pytest.approx((1 + 1 + 2 * 32) / (1 + 1 + 2 * 4))
    assert full / cache_bytes(config, "last", 100, 32) == pytest.approx((1 + 1 + 2 * 32) / (1 + 1 + 2 * 1))
    # the per-token size: 66 layers x (K and V) x 4 heads x 8 dims x 4 bytes
    assert full == 66 * 2 * 4 * 8 * 4 * 100
    # a ring at least as large as the depth costs what full does
    assert cache_bytes(config, "ring:32", 100, 32) == full


@pytest.mark.parametrize(
    "kwargs",
    [
        {"batch_size": 0, "capacity": 4},
        {"batch_size": 1, "capacity": 0},
        {"batch_size": 1, "capacity": 4, "max_loops": 0},
        {"batch_size": 1, "capacity": 4, "policy": "ring:x"},
    ],
)
def test_cache_construction_errors(kwargs: dict) -> None:
    with pytest.raises(InputError):
        KVCache(CONFIG, **kwargs)


# ----- the early-exit fallback against a slow reference ------------------------------------------------
BATCH, CAPACITY = 4, 12
# committed columns per row; row 1 is left-padded (its first two columns hold no token)
LENGTHS = [7, 5, 9, 3]
PADDING = {1: [0, 1], 3: [0]}


def filled_cache(policy: str) -> KVCache:
    """A cache whose every core slot / row / column holds distinct random values, with hand-set bookkeeping.

    Valid tokens get random depths in 1..MAX_STEPS (some shallow, some deep); padding and columns past the
    length are invalid.
    """
    generator = torch.Generator().manual_seed(1)
    cache = KVCache(CONFIG, BATCH, CAPACITY, policy, max_loops=MAX_STEPS)
    for role in ("prelude", "core", "coda"):
        for tensor in cache.store[role]:
            tensor.copy_(torch.randn(tensor.shape, generator=generator))
    cache.lengths = torch.tensor(LENGTHS)
    cache.valid = torch.arange(CAPACITY)[None] < cache.lengths[:, None]
    for row, columns in PADDING.items():
        cache.valid[row, columns] = False
    cache.positions = (cache.valid.long().cumsum(dim=1) - 1).clamp_min(0)
    cache.depth = torch.randint(1, MAX_STEPS + 1, (BATCH, CAPACITY), generator=generator)
    # make sure both extremes occur among the valid tokens of every row
    for row in range(BATCH):
        real = cache.valid[row].nonzero().squeeze(1).tolist()
        cache.depth[row, real[0]] = 1
        cache.depth[row, real[-1]] = MAX_STEPS
    cache.depth[~cache.valid] = 0
    return cache


def reference_core(
    cache: KVCache,
    snapshot: tuple[torch.Tensor, torch.Tensor],
    rows: list[int],
    new_columns: list[list[int]],
    layer: int,
    iteration: int,
    new: tuple[torch.Tensor, torch.Tensor],
    end: int,
) -> dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor] | None]:
    """What a core query at ``iteration`` must read, per (local row, column): None where anything goes (masked).

    The rule of the cache module: a committed token of depth d gives its entry of iteration min(i, d - 1),
    stored in the slot the policy assigns to that iteration; a column of the current pass gives what was
    just written.
    """
    policy = cache.policy
    expected: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor] | None] = {}
    for local, row in enumerate(rows):
        for column in range(end):
            if column in new_columns[local]:
                t = new_columns[local].index(column)
                expected[local, column] = (new[0][local, t], new[1][local, t])  # [H, D]
            elif bool(cache.valid[row, column]):
                depth = int(cache.depth[row, column])
                slot = policy.slot(min(iteration, depth - 1))
                expected[local, column] = (
                    snapshot[0][layer, slot, row, :, column],
                    snapshot[1][layer, slot, row, :, column],
                )
            else:
                expected[local, column] = None
    return expected


def check_exchange(cache: KVCache, rows: list[int], count: int, select: list[int] | None = None) -> int:
    """Begin a pass of ``count`` new columns for ``rows`` (optionally viewed through ``select``), run every
    iteration through both core layers, compare with the reference; returns how many entries were compared."""
    snapshot = tuple(t.clone() for t in cache.store["core"])
    row_tensor = torch.tensor(rows)
    starts = cache.lengths[row_tensor]
    positions = cache.next_positions(row_tensor)[:, None] + torch.arange(count)
    kv = cache.begin(row_tensor, positions)
    assert kv.end == int(starts.max()) + count
    if select is not None:
        kv = kv.select(torch.tensor(select))
        rows = [rows[j] for j in select]
    new_columns = [list(range(int(cache.lengths[r]), int(cache.lengths[r]) + count)) for r in rows]
    heads, dim = CONFIG.n_kv_heads, CONFIG.head_dim
    compared = 0
    generator = torch.Generator().manual_seed(2)
    for iteration in range(MAX_STEPS):
        for layer in range(CONFIG.n_core):
            keys = torch.randn(len(rows), count, heads, dim, generator=generator)
            values = torch.randn(len(rows), count, heads, dim, generator=generator)
            out_k, out_v = kv.exchange("core", layer, iteration, keys, values)
            assert out_k.shape == out_v.shape == (len(rows), heads, kv.end, dim)
            expected = reference_core(cache, snapshot, rows, new_columns, layer, iteration, (keys, values), kv.end)
            for (local, column), entry in expected.items():
                if entry is None:
                    # an invalid column may hold anything, but no query of the row may see it
                    if kv.mask is not None:
                        assert not kv.mask[local, 0, :, column].any()
                    continue
                torch.testing.assert_close(out_k[local, :, column], entry[0], rtol=0, atol=0)
                torch.testing.assert_close(out_v[local, :, column], entry[1], rtol=0, atol=0)
                compared += 1
            # the store now holds the new entries in the slot of this iteration
            slot = cache.policy.slot(iteration)
            for local, row in enumerate(rows):
                written = cache.store["core"][0][layer, slot, row][:, new_columns[local]]  # [H, T, D]
                torch.testing.assert_close(written, keys[local].transpose(0, 1), rtol=0, atol=0)
    return compared


@pytest.mark.parametrize("policy", ["full", "ring:3", "ring:2", "last"])
@pytest.mark.parametrize(
    ("rows", "count", "select"),
    [
        ([0, 1, 2, 3], 1, None),  # every row, one new token (decoding)
        ([0, 1, 2, 3], 3, None),  # several new tokens (speculative verification)
        ([2, 0], 1, None),  # a subset of rows, out of order
        ([3, 1, 2], 2, None),
        ([0, 1, 2, 3], 1, [1, 3]),  # a compacted view of the pass
        ([2, 0, 1], 2, [2, 0]),
    ],
)
def test_exchange_follows_the_fallback_rule(policy: str, rows: list[int], count: int, select: list[int] | None) -> None:
    cache = filled_cache(policy)
    compared = check_exchange(cache, rows, count, select)
    assert compared > 0


def test_fallback_reads_older_slots_for_shallow_tokens() -> None:
    """The fallback really changes what is read (not only in the reference): a token of depth 2 read at
    iteration 4 gives its iteration-1 entry, not the (different) content of slot 4."""
    cache = filled_cache("full")
    cache.depth[0, 2] = 2
    kv = cache.begin(torch.tensor([0]), cache.next_positions(torch.tensor([0]))[:, None])
    keys = torch.randn(1, 1, CONFIG.n_kv_heads, CONFIG.head_dim)
    out_k, _ = kv.exchange("core", 1, 4, keys, keys)
    store_k = cache.store["core"][0]
    torch.testing.assert_close(out_k[0, :, 2], store_k[1, 1, 0, :, 2], rtol=0, atol=0)
    assert not torch.equal(out_k[0, :, 2], store_k[1, 4, 0, :, 2])


@pytest.mark.parametrize("role", ["prelude", "coda"])
def test_prelude_and_coda_have_one_slot(role: str) -> None:
    cache = filled_cache("full")
    before = cache.store[role][0].clone()
    rows = torch.tensor([1, 3])
    kv = cache.begin(rows, cache.next_positions(rows)[:, None])
    keys = torch.randn(2, 1, CONFIG.n_kv_heads, CONFIG.head_dim)
    values = torch.randn(2, 1, CONFIG.n_kv_heads, CONFIG.head_dim)
    for iteration in (0, 5):  # the iteration does not matter outside the core
        out_k, out_v = kv.exchange(role, 0, iteration, keys, values)
        for local, row in enumerate(rows.tolist()):
            column = LENGTHS[row]
            torch.testing.assert_close(out_k[local, :, column], keys[local, 0], rtol=0, atol=0)
            torch.testing.assert_close(out_v[local, :, column], values[local, 0], rtol=0, atol=0)
            torch.testing.assert_close(out_k[local, :, :column], before[0, row, :, :column], rtol=0, atol=0)


def test_full_cache_refuses_an_iteration_beyond_max_steps() -> None:
    cache = KVCache(CONFIG, 1, 4, "full", max_loops=3)
    kv = cache.begin(torch.tensor([0]), torch.zeros(1, 1, dtype=torch.long))
    keys = torch.zeros(1, 1, CONFIG.n_kv_heads, CONFIG.head_dim)
    kv.exchange("core", 0, 2, keys, keys)
    with pytest.raises(InputError, match="max_loops"):
        kv.exchange("core", 0, 3, keys, keys)
    ring = KVCache(CONFIG, 1, 4, "ring:2", max_loops=3)
    kv = ring.begin(torch.tensor([0]), torch.zeros(1, 1, dtype=torch.long))
    kv.exchange("core", 0, 7, keys, keys)  # a ring wraps around at any depth


# ----- bookkeeping -------------------------------------------------------------------------------------
def test_commit_and_truncate_bookkeeping() -> None:
    cache = KVCache(CONFIG, 3, 10, "full", max_loops=4)
    rows = torch.arange(3)
    real = torch.tensor([[False, True, True], [True, True, True], [False, False, True]])
    positions = (real.long().cumsum(dim=1) - 1).clamp_min(0)
    cache.begin(rows, positions, real)
    cache.commit(rows, torch.full((3,), 3), torch.full((3, 3), 4))
    assert cache.lengths.tolist() == [3, 3, 3]
    assert cache.valid[:, :3].tolist() == real.tolist()
    assert not cache.valid[:, 3:].any()
    assert cache.next_positions(rows).tolist() == [2, 3, 1]

    # a pass of 4 columns for rows 0 and 2 that keeps 4 and 1 of them
    sub = torch.tensor([0, 2])
    positions = cache.next_positions(sub)[:, None] + torch.arange(4)
    kv = cache.begin(sub, positions)
    assert kv.end == 7
    assert cache.valid[0, 3:7].all() and cache.valid[2, 3:7].all()  # visible during the pass
    cache.commit(sub, torch.tensor([4, 1]), torch.tensor([[1, 2, 3, 4], [2, 2, 2, 2]]))
    assert cache.lengths.tolist() == [7, 3, 4]
    assert cache.valid[0, :7].tolist() == [False, True, True, True, True, True, True]
    assert cache.valid[2].tolist() == [False, False, True, True] + [False] * 6
    assert not cache.valid[1, 3:].any()  # row 1 took no part
    assert cache.depth[0, 3:7].tolist() == [1, 2, 3, 4]
    assert cache.depth[2, 3:5].tolist() == [2, 0]  # a forgotten column keeps no depth
    assert cache.positions[0, :7].tolist() == [0, 0, 1, 2, 3, 4, 5]
    assert cache.next_positions(rows).tolist() == [6, 3, 2]

    # roll row 0 back: everything after the new length is forgotten
    cache.truncate(torch.tensor([0]), torch.tensor([4]))
    assert cache.lengths.tolist() == [4, 3, 4]
    assert cache.valid[0].tolist() == [False, True, True, True] + [False] * 6
    assert cache.next_positions(rows).tolist() == [3, 3, 2]
    snapshot = cache.rows_snapshot(torch.tensor([0]))
    assert snapshot["lengths"].tolist() == [4] and snapshot["valid"][0].tolist() == cache.valid[0].tolist()


def test_pass_beyond_capacity_is_refused() -> None:
    cache = KVCache(CONFIG, 2, 5, "full", max_loops=2)
    rows = torch.arange(2)
    cache.begin(rows, torch.arange(4).expand(2, 4))
    cache.commit(rows, torch.tensor([4, 2]), torch.full((2, 4), 2))
    cache.begin(torch.tensor([1]), torch.tensor([[2, 3, 4]]))  # row 1 has room for 3 more
    cache.truncate(torch.tensor([1]), torch.tensor([2]))
    with pytest.raises(InputError, match="holds 5 tokens per row; this pass needs 6"):
        cache.begin(rows, torch.tensor([[4, 5], [2, 3]]))
    with pytest.raises(InputError, match="needs 6"):
        cache.begin(torch.tensor([0]), torch.tensor([[4, 5]]))
    assert cache.lengths.tolist() == [4, 2]


# ----- masks -------------------------------------------------------------------------------------------
def attend(mask: torch.Tensor | None, batch: int, queries: int, keys: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(3)
    q = torch.randn(batch, 2, queries, 4, generator=generator)
    k = torch.randn(batch, 2, keys, 4, generator=generator)
    v = torch.randn(batch, 2, keys, 4, generator=generator)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def test_mask_of_a_left_padded_prefill() -> None:
    cache = KVCache(CONFIG, 2, 8, "full", max_loops=2)
    real = torch.tensor([[False, False, True, True], [True, True, True, True]])
    positions = (real.long().cumsum(dim=1) - 1).clamp_min(0)
    kv = cache.begin(torch.arange(2), positions, real)
    assert kv.mask is not None and kv.mask.shape == (2, 1, 4, 4)
    causal = torch.ones(4, 4, dtype=torch.bool).tril()
    assert kv.mask[1, 0].tolist() == causal.tolist()
    expected = [
        [True, False, False, False],  # a padding query sees only itself
        [False, True, False, False],
        [False, False, True, False],  # real queries see only real columns
        [False, False, True, True],
    ]
    assert kv.mask[0, 0].tolist() == expected
    assert torch.isfinite(attend(kv.mask, 2, 4, 4)).all()


def test_mask_of_a_decode_step() -> None:
    cache = KVCache(CONFIG, 2, 8, "full", max_loops=2)
    rows = torch.arange(2)
    real = torch.tensor([[False, True, True], [True, True, True]])
    cache.begin(rows, (real.long().cumsum(dim=1) - 1).clamp_min(0), real)
    cache.commit(rows, torch.full((2,), 3), torch.full((2, 3), 2))
    kv = cache.begin(rows, cache.next_positions(rows)[:, None])
    assert kv.mask[:, 0, 0].tolist() == [[False, True, True, True], [True, True, True, True]]
    # rows of unequal length: the shorter one must not see the longer one's columns
    cache.commit(rows, torch.ones(2, dtype=torch.long), torch.full((2, 1), 2))
    cache.begin(torch.tensor([1]), cache.next_positions(torch.tensor([1]))[:, None])
    cache.commit(torch.tensor([1]), torch.ones(1, dtype=torch.long), torch.full((1, 1), 2))
    kv = cache.begin(rows, cache.next_positions(rows)[:, None])
    assert kv.end == 6
    assert kv.mask[:, 0, 0].tolist() == [[False, True, True, True, True, False], [True] * 6]
    # every row of equal length, no padding: no mask needed
    plain = KVCache(CONFIG, 2, 8, "full", max_loops=2)
    plain.begin(rows, torch.arange(3).expand(2, 3))
    plain.commit(rows, torch.full((2,), 3), torch.full((2, 3), 2))
    assert plain.begin(rows, plain.next_positions(rows)[:, None]).mask is None


def test_mask_of_a_sliding_window() -> None:
    config = small_config(sliding_window=3)
    cache = KVCache(config, 1, 10, "full", max_loops=2)
    rows = torch.tensor([0])
    kv = cache.begin(rows, torch.arange(6)[None])
    i, j = torch.arange(6)[:, None], torch.arange(6)[None]
    assert kv.mask[0, 0].tolist() == ((j <= i) & (i - j < 3)).tolist()
    cache.commit(rows, torch.tensor([6]), torch.full((1, 6), 2))
    kv = cache.begin(rows, torch.tensor([[6]]))
    assert kv.mask[0, 0, 0].tolist() == [False] * 4 + [True] * 3
    # within the window at the start of a sequence no mask is needed
    short = KVCache(config, 1, 10, "full", max_loops=2)
    short.begin(rows, torch.arange(2)[None])
    short.commit(rows, torch.tensor([2]), torch.full((1, 2), 2))
    assert short.begin(rows, torch.tensor([[2]])).mask is None


def test_window_counts_positions_not_columns() -> None:
    """With left padding the window is measured in RoPE positions, so padding does not shrink it."""
    config = small_config(sliding_window=2)
    cache = KVCache(config, 1, 8, "full", max_loops=2)
    real = torch.tensor([[False, False, True, True, True]])
    kv = cache.begin(torch.tensor([0]), (real.long().cumsum(dim=1) - 1).clamp_min(0), real)
    assert kv.mask[0, 0].tolist() == [
        [True, False, False, False, False],
        [False, True, False, False, False],
        [False, False, True, False, False],
        [False, False, True, True, False],
        [False, False, False, True, True],
    ]
    assert torch.isfinite(attend(kv.mask, 1, 5, 5)).all()


def test_select_keeps_the_rows_of_the_mask() -> None:
    cache = KVCache(CONFIG, 3, 6, "full", max_loops=2)
    real = torch.tensor([[False, True], [True, True], [False, False]])
    kv = cache.begin(torch.arange(3), (real.long().cumsum(dim=1) - 1).clamp_min(0), real)
    view = kv.select(torch.tensor([2, 0]))
    assert view.rows.tolist() == [2, 0]
    assert torch.equal(view.mask, kv.mask[torch.tensor([2, 0])])
    # an all-padding row: each query sees itself only, the attention stays finite
    assert view.mask[0, 0].tolist() == [[True, False], [False, True]]
    assert torch.isfinite(attend(view.mask, 2, 2, 2)).all()
