"""The compiled decode step: the static step equals the eager one, the engine switches to the compiled graph when
it is ready and gives the same tokens, and a step that cannot compile leaves the engine on the eager step."""

from __future__ import annotations

import logging

import pytest
import torch

import phi4flash
from phi4flash import GenerationConfig, load_model
from phi4flash import compiled as compiled_module
from phi4flash import heartbeat as heartbeat_module
from phi4flash.compiled import CompiledDecoder, compile_pays, wants_compile

COMPILE_LOG: list[str] = []  # what the engines fixture's compile logged
PROMPTS = ["What is 487 + 356?", "Solve 4x - 7 = 21", "What is 25% of 80?"]


def test_static_step_equals_the_eager_step_past_a_cache_growth() -> None:
    model = load_model("embedded")
    ids = torch.randint(0, 500, (3, 30))
    eager, static = model.new_cache(3, 32), model.new_cache(3, 32)
    with torch.no_grad():
        model(ids, cache=eager, logits_to_keep=1)
        model(ids, cache=static, logits_to_keep=1)
        token = torch.tensor([5, 6, 7])
        for _ in range(6):  # 30 + 6 > 32: the caches grow on the way
            expected = model.step(token, eager)
            static.grow(int(static.lengths.max()) + 1)
            got = model.step(token, static, rows=slice(0, 3), static=True)
            assert (got - expected).abs().max().item() <= 1e-5
            token = expected.argmax(-1)
    assert torch.equal(eager.lengths, static.lengths)
    with pytest.raises(ValueError, match="one token per row"):
        model(ids[:, :2], cache=static, static=True)


def test_compiling_is_asked_for_and_pays_for_small_cpu_models(monkeypatch) -> None:
    model = load_model("embedded")
    monkeypatch.delenv("PHI4FLASH_COMPILE", raising=False)
    assert compile_pays(model) and not wants_compile("auto", model) and wants_compile("auto", model, default=True)
    monkeypatch.setattr(compiled_module, "SMALL_MODEL_PARAMETERS", 1000)  # as if it were the real model's size
    assert not compile_pays(model) and not wants_compile("auto", model, default=True)
    monkeypatch.setenv("PHI4FLASH_COMPILE", "1")
    assert wants_compile("auto", model) and not wants_compile(False, model)
    monkeypatch.setenv("PHI4FLASH_COMPILE", "0")
    assert not wants_compile("auto", model, default=True) and wants_compile(True, model)


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture(scope="module")
def engines():
    lines, logger = _Lines(), logging.getLogger("phi4flash.compiled")
    level, every = logger.level, heartbeat_module.HEARTBEAT_SECONDS
    logger.addHandler(lines)
    logger.setLevel(logging.INFO)
    heartbeat_module.HEARTBEAT_SECONDS = 0.5  # a compile takes seconds
    try:
        compiled = phi4flash.load("embedded", compile=True)  # compiles while loading
    finally:
        logger.removeHandler(lines)
        logger.setLevel(level)
        heartbeat_module.HEARTBEAT_SECONDS = every
    eager = phi4flash.load("embedded", compile=False)
    assert compiled.compiled_step == "compiled", compiled.compiled_step
    COMPILE_LOG[:] = lines.lines
    yield compiled, eager
    compiled.close()
    eager.close()


def test_compiling_says_that_it_still_runs_until_it_is_done(engines) -> None:
    """A compile says so when it starts, every HEARTBEAT_SECONDS while it runs (minutes for the real model), and
    when it is done."""
    log = COMPILE_LOG
    assert log[0].startswith("compiling the decode step") and log[-1].startswith("compiled decode step ready in")
    assert log[1:-1] and all(line.startswith("still compiling the decode step (") for line in log[1:-1])


def test_engine_decodes_through_the_compiled_graph_with_the_same_tokens(engines) -> None:
    compiled, eager = engines
    assert eager.compiled_step == "eager"
    calls = []
    original = compiled._compiled._step
    compiled._compiled._step = lambda *args: calls.append(args[0].shape[0]) or original(*args)
    try:
        config = GenerationConfig(temperature=0, max_new_tokens=120)
        conversations = [[{"role": "user", "content": p}] for p in PROMPTS]
        got = compiled.generate_batch(conversations, config)
        expected = eager.generate_batch(conversations, config)
        alone = compiled.generate(conversations[1], config)
    finally:
        compiled._compiled._step = original
    assert [c.token_ids for c in got] == [c.token_ids for c in expected]
    assert alone.token_ids == expected[1].token_ids
    assert calls and max(calls) >= 2 and 1 in calls  # the graph ran for a batch and for one row


def test_every_batch_size_takes_a_graph_compiled_while_loading(engines) -> None:
    """The compile while loading serves every batch size up to max_batch, at any cache length: no request waits for
    a recompile (the model told its rows apart by identity, and dynamo then compiled one graph per batch size)."""
    compiled, eager = engines
    model, decoder = compiled.model, compiled._compiled
    rows = compiled.max_batch
    cache, reference = model.new_cache(rows, 16), model.new_cache(rows, 16)
    prompt = torch.randint(0, 500, (rows, 12))
    with torch.no_grad():
        model(prompt, cache=cache, logits_to_keep=1)
        model(prompt, cache=reference, logits_to_keep=1)
        with torch.compiler.set_stance("fail_on_recompile"):
            for n in [*range(1, rows + 1), rows, 3, 1]:  # the cache grows past 16 on the way
                token = torch.arange(n) + 7
                got = decoder(token, cache)
                expected = model.step(token, reference, rows=list(range(n)))
                assert (got - expected).abs().max().item() <= 1e-4


def test_a_step_that_cannot_compile_leaves_the_eager_step(monkeypatch) -> None:
    def broken(self, ids, cache):  # noqa: ANN001, ANN202
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(CompiledDecoder, "_static_step", broken)
    engine = phi4flash.load("embedded", compile=True)
    try:
        assert engine.compiled_step == "eager (RuntimeError: no compiler here)"
        answer = engine.generate([{"role": "user", "content": PROMPTS[0]}],
                                 GenerationConfig(temperature=0, max_new_tokens=120)).answer
        assert "843" in answer
    finally:
        engine.close()


def test_chat_demo_and_serve_pass_the_compile_flag_to_load(monkeypatch) -> None:
    """--compile reaches ``phi4flash.load`` as compile=True on every face; without it, "auto" (the environment)."""
    from phi4flash import chat
    from phi4flash.server.cli import build_parser
    from phi4flash.server.cli import load_engine as serve_load
    from phi4flash_demo.cli import load_engine as demo_load
    from phi4flash_demo.cli import parse_args

    seen = []

    def load(source: str, **kwargs: object) -> None:
        seen.append(kwargs.get("compile"))
        raise RuntimeError("loading stops here")

    monkeypatch.setattr(phi4flash, "load", load)
    for flags in (["--compile"], []):
        assert chat.main(flags) == 1  # the load error ends the command
        assert isinstance(demo_load(parse_args(flags)), RuntimeError)
        args = build_parser().parse_args(flags)
        with pytest.raises(RuntimeError, match="loading stops here"):
            serve_load(args.model, max_batch=1, compile=True if args.compile else "auto")
    assert seen == [True, True, True, "auto", "auto", "auto"]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graphs_replay_the_static_step_and_are_captured_again_when_the_cache_grows(dtype: torch.dtype) -> None:
    """On CUDA the step replays a CUDA graph per number of rows; the capture leaves the cache as it was, a grown
    cache (new global K/V tensors) gets new graphs, and every replay gives the eager static step's logits."""
    model = load_model("embedded", device="cuda", dtype=dtype)
    decoder = CompiledDecoder(model)
    assert decoder.compile(4, 16), decoder.error
    assert len(decoder._step) == 0  # the scratch cache's graphs are dropped with it
    cache, reference = model.new_cache(4, 16), model.new_cache(4, 16)
    prompt = torch.randint(0, 500, (4, 12), device="cuda")
    tolerance = 1e-4 if dtype == torch.float32 else 2e-2
    with torch.no_grad():
        model(prompt, cache=cache, logits_to_keep=1)
        model(prompt, cache=reference, logits_to_keep=1)
        captured = []
        for n in [4, 4, 1, 3, 4, 2, 4, 4, 1, 4]:  # past 16 positions the cache grows: its graphs are new
            token = torch.arange(n, device="cuda") + 7
            got = decoder(token, cache)
            reference.grow(int(reference.lengths[:n].max()) + 1)
            expected = model.step(token, reference, rows=slice(0, n), static=True)
            scale = expected.abs().max().item()
            assert (got - expected).abs().max().item() <= tolerance * max(1.0, scale), n
            captured.append((len(decoder._step), cache.max_length))
    assert torch.equal(cache.lengths, reference.lengths)
    for state, expected_state in zip(cache.layers.values(), reference.layers.values(), strict=True):
        for name, tensor in vars(state).items():
            assert torch.allclose(tensor.float(), getattr(expected_state, name).float(), atol=tolerance), name
    assert captured[3] == (3, 16)  # 4, 1 and 3 rows, on the first cache
    assert captured[4] == (1, 32)  # the cache grew: its old graphs are dropped, 4 rows captured anew
    assert captured[-1] == (3, 32)


@pytest.mark.gpu
def test_cuda_engine_decodes_through_the_graphs_by_default_with_the_eager_tokens(monkeypatch) -> None:
    """On CUDA the graphs cost under a second, so the engine takes them unless told not to."""
    monkeypatch.delenv("PHI4FLASH_COMPILE", raising=False)
    graphed = phi4flash.load("embedded", device="cuda", dtype="float32")
    eager = phi4flash.load("embedded", device="cuda", dtype="float32", compile=False)
    try:
        assert graphed.compiled_step == "compiled", graphed.compiled_step
        config = GenerationConfig(temperature=0, max_new_tokens=120)
        conversations = [[{"role": "user", "content": p}] for p in PROMPTS]
        got = graphed.generate_batch(conversations, config)
        expected = eager.generate_batch(conversations, config)
        assert [c.token_ids for c in got] == [c.token_ids for c in expected]
        assert len(graphed._compiled._step) >= 1
    finally:
        graphed.close()
        eager.close()
