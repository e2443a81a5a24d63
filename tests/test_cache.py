"""Decode state: prefill + steps == full forward, the prefill skip, chunking, kept states, mixed-length rows."""

from __future__ import annotations

import pytest
import torch
from model_helpers import tiny_model

WINDOW = 8


def _full(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("prompt_len", [3, WINDOW, WINDOW + 5, 2 * WINDOW + 1])
def test_prefill_then_steps_reproduce_the_full_forward(seed: int, prompt_len: int) -> None:
    model = tiny_model(seed)
    ids = torch.randint(0, 100, (2, prompt_len + 3 * WINDOW))  # the generation runs well past the window
    expected = _full(model, ids)
    cache = model.new_cache(2, 8)  # small on purpose: the global K/V grows
    with torch.no_grad():
        first = model(ids[:, :prompt_len], cache=cache, logits_to_keep=1)[:, -1]
        steps = [model.step(ids[:, t], cache) for t in range(prompt_len, ids.shape[1])]
    assert (first - expected[:, prompt_len - 1]).abs().max() <= 2e-4
    assert (torch.stack(steps, 1) - expected[:, prompt_len:]).abs().max() <= 2e-4
    assert cache.lengths.tolist() == [ids.shape[1]] * 2


def test_prefill_skip_gives_the_same_next_token_logits() -> None:
    model = tiny_model()
    ids = torch.randint(0, 100, (2, 30))
    with torch.no_grad():
        skipped = model(ids, cache=model.new_cache(2, 64), logits_to_keep=1)
        full = model(ids, cache=model.new_cache(2, 64), logits_to_keep=1, skip_cross_decoder=False)
        stateless = model(ids)[:, -1:]
    assert (skipped - full).abs().max() <= 1e-5
    assert (skipped - stateless).abs().max() <= 1e-5


def test_prefill_runs_the_self_decoder_only_and_the_next_logits_are_unchanged() -> None:
    model = tiny_model()
    ids = torch.randint(0, 100, (2, 3 * WINDOW + 2))
    expected = _full(model, ids)
    cross_calls, first_calls = [], []
    first_cross = model.model.layers[model.config.kv_layer + 1]
    handles = [first_cross.register_forward_hook(lambda *args: cross_calls.append(1)),
               model.model.layers[0].register_forward_hook(lambda module, args, out: first_calls.append(
                   args[0].shape[1]))]
    cache = model.new_cache(2, 64)
    try:
        model.prefill(ids[:, :-1], cache, chunk=WINDOW)  # the prompt but its last token, in chunks
        assert first_calls == [WINDOW, WINDOW, WINDOW, 1]
        assert not cross_calls and cache.lengths.tolist() == [ids.shape[1] - 1] * 2
        with torch.no_grad():
            last = model(ids[:, -1:], cache=cache, logits_to_keep=1)[:, -1]
    finally:
        for handle in handles:
            handle.remove()
    assert cross_calls == [1]
    assert (last - expected[:, -1]).abs().max() <= 2e-4


def test_chunked_prefill_and_multi_token_continuation_equal_one_shot() -> None:
    model = tiny_model()
    ids = torch.randint(0, 100, (1, 41))
    expected = _full(model, ids)
    cache = model.new_cache(1, 64)
    with torch.no_grad():
        for start in range(0, 35, 6):
            out = model(ids[:, start:min(start + 6, 35)], cache=cache)  # every position's logits
            assert (out - expected[:, start:min(start + 6, 35)]).abs().max() <= 2e-4
        tail = model(ids[:, 35:], cache=cache)
    assert (tail - expected[:, 35:]).abs().max() <= 2e-4


@pytest.mark.parametrize("chunk", [33, 64, 130])
def test_long_chunks_through_the_fused_kernels_equal_the_full_forward(chunk: int) -> None:
    """Chunks of 32+ queries take SDPA's fused kernel; chunks of more than 128 the sliding layers' query
    blocks, starting from a ring that is not aligned with the window."""
    model = tiny_model(sliding_window=40)
    ids = torch.randint(0, 100, (1, 300))
    expected = _full(model, ids)
    for skip in (False, True):
        cache = model.new_cache(1, 64)
        with torch.no_grad():
            for start in range(0, 300, chunk):
                out = model(ids[:, start:start + chunk], cache=cache, skip_cross_decoder=skip)
                assert (out[:, -1] - expected[:, min(start + chunk, 300) - 1]).abs().max() <= 2e-4
                if not skip:
                    assert (out - expected[:, start:start + chunk]).abs().max() <= 2e-4


def test_kept_state_continues_like_the_whole_conversation() -> None:
    model = tiny_model()
    ids = torch.randint(0, 100, (1, 30))
    expected = _full(model, ids)
    first = model.new_cache(2, 32)
    with torch.no_grad():
        model(ids[:, :17], cache=first, rows=[1])
        snapshot = first.extract(1)
        second = model.new_cache(3, 32)
        second.load(2, snapshot)
        out = model(ids[:, 17:], cache=second, rows=[2])
    assert snapshot.lengths.tolist() == [17]
    assert (out - expected[:, 17:]).abs().max() <= 2e-4


@pytest.mark.parametrize("rows", [[2, 0], [1, 2]])  # an index (copies) and a run of rows (views)
@pytest.mark.parametrize("length_a", [19, 7])  # past the window of 8 (its ring wraps), within it (rings unwrapped)
def test_rows_at_different_lengths_decode_together(rows: list[int], length_a: int) -> None:
    model = tiny_model()
    a, b = torch.randint(0, 100, (1, length_a)), torch.randint(0, 100, (1, 6))
    exp_a, exp_b = _full(model, a), _full(model, b)
    cache = model.new_cache(3, 32)
    with torch.no_grad():
        model(a[:, :length_a - 4], cache=cache, rows=rows[:1])
        model(b[:, :2], cache=cache, rows=rows[1:])
        for t in range(4):
            logits = model.step(torch.tensor([a[0, length_a - 4 + t], b[0, 2 + t]]), cache, rows=rows)
            assert (logits[0] - exp_a[0, length_a - 4 + t]).abs().max() <= 2e-4
            assert (logits[1] - exp_b[0, 2 + t]).abs().max() <= 2e-4
    lengths = [0, 0, 0]
    lengths[rows[0]], lengths[rows[1]] = length_a, 6
    assert cache.lengths.tolist() == lengths


def test_decode_reads_only_the_ring_slots_written_so_far() -> None:
    """Until a row passes the window, a sliding layer's decode step attends the slots up to the longest row's
    position, not the whole ring (the rest hold nothing yet); past it, the whole ring."""
    model = tiny_model()
    sliding = [layer.attn for layer in model.model.layers if getattr(layer.attn, "window", None)]
    assert sliding
    keys_read: list[int] = []
    for attn in sliding:
        attn.inner_cross_attn.register_forward_pre_hook(lambda _, args: keys_read.append(args[1].shape[1]))
    cache = model.new_cache(2, 32)
    with torch.no_grad():
        model(torch.randint(0, 100, (2, 3)), cache=cache)
        reads = []
        for _ in range(WINDOW):
            keys_read.clear()
            model.step(torch.randint(0, 100, (2,)), cache)
            assert len(set(keys_read)) == 1
            reads.append(keys_read[0])
    assert reads == [4, 5, 6, 7, 8, 8, 8, 8]


def test_a_moved_row_continues_where_it_was() -> None:
    """move_row carries every layer's state and the length: the moved sequence decodes as if it had not moved."""
    model = tiny_model()
    a = torch.randint(0, 100, (1, 24))  # past the window of 8: the ring has wrapped
    expected = _full(model, a)
    cache = model.new_cache(3, 32)
    with torch.no_grad():
        model(a[:, :20], cache=cache, rows=[2])
        model(torch.randint(0, 100, (1, 9)), cache=cache, rows=[0])  # something to overwrite
        cache.move_row(2, 0)
        for t in range(4):
            logits = model.step(a[:, 20 + t], cache, rows=[0])
            assert (logits[0] - expected[0, 20 + t]).abs().max() <= 2e-4
    assert cache.lengths.tolist()[0] == 24


def test_cache_state_sizes_and_reset() -> None:
    model = tiny_model()
    cache = model.new_cache(2, 16)
    config = model.config
    mamba = cache.layers[0]
    assert tuple(mamba.conv.shape) == (2, config.mamba_d_inner, config.mamba_d_conv)
    assert tuple(cache.layers[1].k.shape) == (2, WINDOW, config.num_key_value_heads, config.head_dim)
    assert set(cache.layers) == {0, 1, 2, 3, 4, 5}  # GMU (6) and cross-attention (7) keep nothing
    with torch.no_grad():
        model(torch.randint(0, 100, (2, 5)), cache=cache)
    cache.reset([0])
    assert cache.lengths.tolist() == [0, 5]
    assert cache.layers[0].ssm[0].abs().sum() == 0 and cache.layers[0].ssm[1].abs().sum() > 0
    with pytest.raises(ValueError, match="same length"):
        model(torch.randint(0, 100, (2, 3)), cache=cache)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_prefill_and_decode_match_the_cpu_full_forward(dtype: torch.dtype) -> None:
    # On CUDA the optional kernels (mamba-ssm, causal-conv1d) take the fresh prefill and the steps.
    model = tiny_model()
    ids = torch.randint(0, 100, (2, 40))
    expected = _full(model, ids)
    gpu = tiny_model().cuda().to_dtype(dtype)
    cache = gpu.new_cache(2, 64)
    with torch.no_grad():
        first = gpu(ids[:, :20].cuda(), cache=cache, logits_to_keep=1)[:, -1]
        steps = [gpu.step(ids[:, t].cuda(), cache) for t in range(20, 40)]
    got = torch.cat([first[:, None], torch.stack(steps, 1)], 1).cpu()
    bound = 2e-3 if dtype == torch.float32 else 0.1 * expected.abs().max().item()
    assert (got - expected[:, 19:]).abs().max() <= bound
