"""The training loop of the embedded model, end to end on a tiny budget, its compiled step, and its scan and
convolution."""

from __future__ import annotations

import json
import shlex
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from tokenizers import Tokenizer

from phi4flash import native, ops
from phi4flash.config import Phi4FlashConfig
from phi4flash.training import data
from phi4flash.training.train import (
    EMBEDDED_DIR,
    PYTHON_CALL,
    Batch,
    Encoded,
    TrainConfig,
    argument_values,
    encode_example,
    lr_at,
    main,
    make_batches,
    train,
    train_step,
    training_scan,
)

TINY = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 8,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "sliding_window": 16,
    "mamba_d_state": 4,
}


@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("native_kernels", [True, False])
def test_training_scan_matches_the_reference_values_and_gradients(with_state: bool, native_kernels: bool,
                                                                  monkeypatch) -> None:
    if native_kernels and not native.ready():
        pytest.skip("phi4flash's C++ kernels could not be built here")
    if not native_kernels:  # the PyTorch chunked scan, which runs where there is no compiler
        monkeypatch.setattr(ops, "native_scan", lambda *args: None)
    g = torch.Generator().manual_seed(0)
    b, e, t, n = 2, 6, 21, 3  # 21 tokens: several chunks of the training scan, the last one partial
    leaves = [
        torch.randn(b, e, t, generator=g),
        torch.rand(b, e, t, generator=g) * 0.5,
        -torch.rand(e, n, generator=g) - 0.1,
        torch.randn(b, n, t, generator=g),
        torch.randn(b, n, t, generator=g),
        torch.randn(e, generator=g),
    ]
    state = torch.randn(b, e, n, generator=g) if with_state else None
    outs = []
    for fn in (ops.selective_scan_reference, training_scan):
        args = [x.clone().requires_grad_() for x in leaves]
        y, last = fn(*args, state=state)
        (y.square().sum() + last.sum()).backward()
        outs.append((y.detach(), last.detach(), [a.grad for a in args]))
    (y0, s0, g0), (y1, s1, g1) = outs
    torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s1, s0, rtol=1e-5, atol=1e-5)
    for a, b_ in zip(g0, g1, strict=True):
        torch.testing.assert_close(b_, a, rtol=1e-4, atol=1e-4)


def test_lr_schedule_warms_up_then_decays() -> None:
    cfg = TrainConfig(steps=100, warmup_steps=10, lr=1e-3, min_lr_ratio=0.1)
    assert lr_at(0, cfg) < lr_at(9, cfg) == 1e-3
    assert lr_at(50, cfg) < 1e-3
    assert abs(lr_at(100, cfg) - 1e-4) < 1e-9
    # with a time budget the decay follows the share of the time spent, not the steps
    assert lr_at(20, cfg, progress=0.0) == 1e-3 and abs(lr_at(20, cfg, progress=1.0) - 1e-4) < 1e-9


def test_a_time_budget_stops_the_run_in_time(tmp_path: Path) -> None:
    cfg = TrainConfig(steps=400, minutes=0.05, batch_size=4, warmup_steps=2, vocab_size=384, tokenizer_examples=400,
                      model=dict(TINY), seed=2, compile=False)
    result = train(cfg, tmp_path)
    assert 0 < len(result.losses) < 400 and result.summary["steps"] == len(result.losses)
    assert result.seconds < 0.05 * 60 + 5  # the last step may run over a little


@pytest.mark.parametrize("native_bf16", [False, True])
def test_the_default_precision_is_bfloat16_only_where_the_cpu_multiplies_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, native_bf16: bool) -> None:
    from phi4flash.training import train as train_mod

    seen: list[bool] = []

    def recording_step(*args: Any, bf16: bool = True, **kwargs: Any) -> float:
        seen.append(bf16)
        return train_step(*args, bf16=bf16, **kwargs)

    monkeypatch.setattr(train_mod, "cpu_multiplies_bfloat16", lambda: native_bf16)
    monkeypatch.setattr(train_mod, "train_step", recording_step)
    cfg = TrainConfig(steps=2, minutes=None, batch_size=2, warmup_steps=1, vocab_size=384, tokenizer_examples=200,
                      model=dict(TINY), seed=2, compile=False)
    assert cfg.bf16 is None
    result = train(cfg, tmp_path / "auto")
    assert seen == [native_bf16] * 2
    assert result.summary["precision"] == ("bfloat16 autocast" if native_bf16 else "float32")
    seen.clear()
    result = train(replace(cfg, bf16=not native_bf16), tmp_path / "asked")  # an explicit choice wins
    assert seen == [not native_bf16] * 2
    assert result.summary["precision"] == ("float32" if native_bf16 else "bfloat16 autocast")


def test_batches_put_the_loss_on_the_assistant_turn_only() -> None:
    encoded = [Encoded([1, 2, 3, 4, 5], [(3, 5)]), Encoded([1, 2, 6, 7], [(2, 4)]),
               Encoded([9, 9, 9, 9, 9, 9], [(4, 6)]), Encoded([5, 6, 7], [(1, 3)])]
    batches = make_batches(encoded, batch_size=2, pad_id=0, seed=0)
    rows = {}
    for x, y, weights in batches:
        assert weights is None  # every trained token counts the same unless tool names weigh more
        for xi, yi in zip(x.tolist(), y.tolist(), strict=True):
            rows[tuple(v for v in xi if v)] = yi
    assert rows[(1, 2, 3, 4, 5)][:5] == [-100, -100, 4, 5, -100]
    assert rows[(1, 2, 6, 7)][:4] == [-100, 6, 7, -100]


def test_batches_put_the_loss_on_every_trained_span() -> None:
    (x, y, _), = make_batches([Encoded([1, 2, 3, 4, 5, 6, 7, 8], [(2, 4), (6, 8)])], batch_size=1, pad_id=0, seed=0)
    assert x[0].tolist() == [1, 2, 3, 4, 5, 6, 7, 8]
    assert y[0].tolist() == [-100, 3, 4, -100, -100, 7, 8, -100]


def test_a_tool_session_trains_every_assistant_turn_and_its_ids_are_the_whole_texts() -> None:
    tok = Tokenizer.from_file(str(EMBEDDED_DIR / "tokenizer.json"))
    sessions = data.generate(40, seed=4, families=["tool"], tool_sessions=1.0)
    assert all(ex.trained_history for ex in sessions)
    for ex in sessions:
        ids, spans, *_ = encode_example(tok, ex)
        assert ids == tok.encode(data.render_prompt(ex.messages) + ex.completion + "<|end|>").ids
        trained = [tok.decode(ids[a:b], skip_special_tokens=False) for a, b in spans]
        replies = [m["content"] for m in ex.messages if m["role"] == "assistant"] + [ex.completion]
        assert len(replies) >= 2 and trained == [reply + "<|end|>" for reply in replies]
        # without the flag only the completion is trained, on the same ids
        assert encode_example(tok, replace(ex, trained_history=False))[:2] == (ids, spans[-1:])


def _encoded_tool_chats(tok: Tokenizer, seed: int) -> list[tuple[Encoded, list[str]]]:
    """120 tool chats, half of them sessions, encoded, each with the texts of its trained turns."""
    out = []
    for ex in data.generate(120, seed=seed, families=["tool"], tool_sessions=0.5):
        encoded = encode_example(tok, ex)
        out.append((encoded, [tok.decode(encoded.ids[a:b], skip_special_tokens=False) for a, b in encoded.spans]))
    return out


def test_the_tool_name_that_a_thought_picks_is_marked_in_every_trained_turn() -> None:
    tok = Tokenizer.from_file(str(EMBEDDED_DIR / "tokenizer.json"))
    marked = 0
    for (ids, spans, names, _), turns in _encoded_tool_chats(tok, seed=6):
        picks = []  # (turn, called name) of the trained calls whose thought names the tool; a cut thought may not
        for turn in turns:
            thought, call, rest = turn.partition("<|tool_call|>")
            called = json.loads(rest.split("<|/tool_call|>")[0])[0]["name"] if call else None
            if called and called in thought:
                picks.append((turn, called))
        assert len(names) == len(picks)  # none for reports, plain answers and cut thoughts
        for (a, b), (turn, called) in zip(names, picks, strict=True):
            end = next(e for s, e in spans if s <= a < b <= e)
            picked = tok.decode(ids[a:b]).strip()
            # the name's tokens, in the thought, before the call
            assert called in picked and len(picked) <= len(called) + 2, (picked, called)
            between, call, _ = tok.decode(ids[b:end], skip_special_tokens=False).partition("<|tool_call|>")
            # the pick is the last mention before the call, not the step before's ("add gave 7, ... with add.")
            assert call and called not in between, (turn, called)
            marked += 1
    assert marked > 100


def test_the_argument_values_of_every_trained_call_are_marked() -> None:
    tok = Tokenizer.from_file(str(EMBEDDED_DIR / "tokenizer.json"))
    marked = 0
    for (ids, spans, _, values), turns in _encoded_tool_chats(tok, seed=7):
        written = []  # every argument value of every trained call, in order
        for turn in turns:
            for rest in turn.split("<|tool_call|>")[1:]:
                for call in json.loads(rest.split("<|/tool_call|>")[0]):
                    written += [str(v) for v in call["arguments"].values()]
        assert len(values) == len(written)
        for (a, b), value in zip(values, written, strict=True):
            assert any(s <= a < b <= e for s, e in spans)
            # the value's tokens: all of it, and at most a quote or a space more
            assert value in tok.decode(ids[a:b]) and b - a <= len(tok.encode(value).ids) + 2, value
            marked += 1
    assert marked > 150


def test_argument_values_of_calls_that_are_not_json_are_not_marked() -> None:
    call = '<|tool_call|>[{"name": "f", "arguments": {"to": "Dutch", "n": -12, "d": "a \\"b\\""}}]<|/tool_call|>'
    text = "Call f." + call + " then" + call.replace("Dutch", "Greek")
    assert [text[a:b] for a, b in argument_values(text)] == ["Dutch", "-12", 'a \\"b\\"', "Greek", "-12", 'a \\"b\\"']
    assert argument_values("<|tool_call|>[{'name': 'f'}]<|/tool_call|> <|tool_call|>[1, 2]<|/tool_call|>") == []


def test_tool_names_weigh_more_in_the_loss_and_the_reported_loss_stays_the_plain_mean() -> None:
    (x, y, weights), = make_batches([Encoded([1, 2, 3, 4, 5, 6, 7, 8], [(2, 6)], [(3, 4)])], batch_size=1, pad_id=0,
                                    seed=0, tool_name_weight=3.0)
    assert y[0].tolist() == [-100, 3, 4, 5, 6, -100, -100, -100]
    assert weights is not None and weights[0].tolist() == [0, 1, 3, 1, 1, 0, 0, 0]
    (_, _, both), = make_batches([Encoded([1, 2, 3, 4, 5, 6, 7, 8], [(2, 6)], [(3, 4)], [(4, 6)])], batch_size=1,
                                 pad_id=0, seed=0, tool_name_weight=3.0, tool_argument_weight=2.0)
    assert both is not None and both[0].tolist() == [0, 1, 3, 2, 2, 0, 0, 0]

    def one_step(w: torch.Tensor | None) -> tuple[float, torch.Tensor]:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Embedding(10, 8), torch.nn.Linear(8, 10))  # logits at every position
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        loss = train_step(model, model, optimizer, x, y, w, bf16=False, grad_clip=100.0, loss_positions_only=False)
        return loss, model[1].weight.detach().clone()

    plain_loss, plain = one_step(None)
    ones_loss, ones = one_step((y != -100).float())
    weighted_loss, weighted = one_step(weights)
    assert ones_loss == pytest.approx(plain_loss) and torch.allclose(ones, plain)  # weights of 1: the plain mean
    assert weighted_loss == pytest.approx(plain_loss)  # reported unweighted, comparable between runs
    assert not torch.allclose(weighted, plain, atol=1e-4)  # but the step follows the weights


def test_a_token_budget_puts_long_chats_in_smaller_batches() -> None:
    rng = torch.Generator().manual_seed(0)
    encoded = [Encoded([1] * n, [(1, n)]) for n in torch.randint(5, 120, (300,), generator=rng).tolist()]
    batches = make_batches(encoded, batch_size=16, pad_id=0, seed=0, max_tokens=400)
    assert sum(len(x) for x, *_ in batches) == len(encoded)  # every chat is used once
    assert all(x.numel() <= 400 and len(x) <= 16 for x, *_ in batches)
    sizes = {x.shape[1]: len(x) for x, *_ in batches}
    assert sizes[max(sizes)] < sizes[min(sizes)]  # the longest chats come fewer at a time


def test_training_continues_from_a_checkpoint_with_its_tokenizer_and_weights(tmp_path: Path) -> None:
    source, continued = tmp_path / "source", tmp_path / "continued"
    first = train(TrainConfig(steps=30, minutes=None, batch_size=8, lr=5e-3, warmup_steps=3, vocab_size=384,
                              tokenizer_examples=600, model=dict(TINY), seed=1, compile=False), source)
    more = train(TrainConfig(steps=4, minutes=None, batch_size=8, lr=1e-4, warmup_steps=1, seed=2,
                             init_from=str(source), compile=False), continued, command="phi4flash train --seed 2")
    assert (continued / "tokenizer.json").read_text() == (source / "tokenizer.json").read_text()
    assert json.loads((continued / "config.json").read_text()) == json.loads((source / "config.json").read_text())
    # it starts where the source ended (new chats, same kind), far below a fresh model's first loss
    assert more.losses[0] < first.losses[0] - 1.0 and more.losses[0] < sum(first.losses[-5:]) / 5 + 0.5
    assert more.summary["train_config"]["init_from"] == str(source)
    assert more.summary["continued_from"] == json.loads((source / "train_summary.json").read_text())
    # each run keeps the command that asked for it (a call from Python: the call, its settings beside it)
    assert more.summary["command"] == "phi4flash train --seed 2" and first.summary["command"] == PYTHON_CALL
    half = tmp_path / "no-tokenizer"  # a checkpoint phi4flash train did not write (no tokenizer.json)
    half.mkdir()
    (half / "config.json").write_text((source / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        train(TrainConfig(steps=1, minutes=None, init_from=str(half)), tmp_path / "nowhere")


def test_training_runs_end_to_end_and_the_loss_goes_down(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Through the compiled step (the default): the chats' batches come in many shapes, and one graph (two: short
    and long batches attend differently) takes them all."""
    from torch._dynamo.utils import counters

    from phi4flash.training import train as train_mod

    shapes: set[tuple[int, ...]] = set()

    def batches_seen(*args: object, **kwargs: object) -> list[Batch]:
        batches = make_batches(*args, **kwargs)  # type: ignore[arg-type]
        shapes.update(tuple(x.shape) for x, *_ in batches[:30])
        return batches

    monkeypatch.setattr(train_mod, "make_batches", batches_seen)
    # at most 2,048 tokens a batch keeps the run short (inductor's split of its sums at 4,096 elements no longer
    # splits the graphs: test_training_compiles_sum_without_size_guards)
    # float32 on every CPU, so that the run takes the same time wherever CI runs (bfloat16 products are slow without
    # AVX512-BF16 or AMX); test_the_training_forward_traces_as_one_graph covers bfloat16 autocast's graph
    cfg = TrainConfig(steps=30, minutes=None, batch_size=8, batch_tokens=2048, lr=5e-3, warmup_steps=3,
                      vocab_size=384, tokenizer_examples=600, model=dict(TINY), seed=1, bf16=False)
    assert cfg.compile
    torch._dynamo.reset()
    counters.clear()
    # graphs cached by earlier runs of other code may carry narrower shape guards of their own
    with torch._inductor.config.patch(force_disable_caches=True):
        result = train(cfg, tmp_path)
    losses = result.losses
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5, losses
    assert result.summary["compiled"] is True
    assert len(shapes) >= 10 and 1 <= counters["stats"]["unique_graphs"] <= 2, (shapes, counters["stats"])

    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json", "special_tokens_map.json", "loss_curve.png", "train_summary.json"):
        assert (tmp_path / name).is_file(), name
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "phi4flash" and config["tie_word_embeddings"] is True
    assert config["vocab_size"] % 64 == 0
    cfg_obj = Phi4FlashConfig.from_json(tmp_path)
    assert cfg_obj.layer_kinds == ["mamba", "sliding_attention", "mamba", "sliding_attention", "mamba_memory",
                                   "full_attention", "gmu", "cross_attention"]
    tok_cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    gen = json.loads((tmp_path / "generation_config.json").read_text())
    ids = {v["content"]: int(k) for k, v in tok_cfg["added_tokens_decoder"].items()}
    assert gen["eos_token_id"] == [ids["<|end|>"], ids["<|endoftext|>"]]
    assert config["eos_token_id"] == config["bos_token_id"] == ids["<|endoftext|>"]
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert "lm_head.weight" not in names
    assert "model.layers.4.attn.A_log" in names and "model.layers.6.attn.in_proj.weight" in names

    # The saved checkpoint loads back through the project's loader and gives the trained model's logits.
    from phi4flash.weights import load_model

    loaded = load_model(tmp_path, dtype=torch.float32)
    ex = data.generate(1, seed=5, split="heldout")[0]
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    ids_ = torch.tensor([tok.encode(data.render_prompt(ex.messages)).ids])
    with torch.no_grad():
        logits = loaded(ids_)
    assert logits.shape == (1, ids_.shape[1], config["vocab_size"])
    assert torch.isfinite(logits).all()


def test_the_command_never_writes_into_the_shipped_model_by_default(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--steps", "0", "--out", str(EMBEDDED_DIR)])
    assert "--overwrite-embedded" in capsys.readouterr().err
    help_text = main.__doc__ or ""
    assert "phi4flash train" in help_text or "training.train" in help_text


def _run_command(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> tuple[TrainConfig, Path, str]:
    """The config, output folder and recorded command line that ``phi4flash train ARGV`` would train with
    (nothing is trained)."""
    seen: dict[str, Any] = {}

    def fake_train(cfg: TrainConfig, out: Path, *, progress: bool = False, command: str | None = None) -> object:
        seen.update(cfg=cfg, out=Path(out), command=command)
        raise SystemExit(0)

    monkeypatch.setattr("phi4flash.training.train.train", fake_train)
    with pytest.raises(SystemExit):
        main(argv)
    return seen["cfg"], seen["out"], seen["command"]


def test_the_default_output_is_a_new_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    _, out, _ = _run_command(["--steps", "0"], monkeypatch)
    assert out.parent == tmp_path and out.name.startswith("phi4flash-embedded-")
    assert out.resolve() != EMBEDDED_DIR.resolve()


def test_the_mix_option_changes_the_named_families_and_keeps_the_others(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--steps", "0", "--out", str(tmp_path / "m")]
    cfg, _, command = _run_command([*argv, "--mix", "tool=0.35, percent=0.15"], monkeypatch)
    assert cfg.weights == {**data.DEFAULT_WEIGHTS, "tool": 0.35, "percent": 0.15}
    # the command train_summary.json keeps, quoted as a shell reads it back
    assert shlex.split(command) == ["phi4flash", "train", *argv, "--mix", "tool=0.35, percent=0.15"]
    cfg, _, _ = _run_command(argv, monkeypatch)
    assert cfg.weights is None  # the defaults, as data.generate reads them
    assert cfg.bf16 is None  # bfloat16 where the CPU multiplies it natively
    assert _run_command([*argv, "--bf16"], monkeypatch)[0].bf16 is True
    assert _run_command([*argv, "--no-bf16"], monkeypatch)[0].bf16 is False
    assert cfg.tool_sessions == 0  # the data of the runs before sessions existed
    cfg, _, _ = _run_command([*argv, "--tool-sessions", "0.4"], monkeypatch)
    assert cfg.tool_sessions == 0.4
    for bad in ("1.5", "-0.1", "half"):
        with pytest.raises(SystemExit):
            main([*argv, "--tool-sessions", bad])
        assert "between 0 and 1" in capsys.readouterr().err, bad
    assert cfg.multi_turn == data.MULTI_TURN_RATE  # the data of the runs before the option existed
    assert _run_command([*argv, "--multi-turn", "0.25"], monkeypatch)[0].multi_turn == 0.25
    cfg, _, _ = _run_command([*argv, "--tool-name-weight", "3"], monkeypatch)
    assert cfg.tool_name_weight == 3.0 and TrainConfig().tool_name_weight == 1.0
    cfg, _, _ = _run_command([*argv, "--tool-argument-weight", "2.5"], monkeypatch)
    assert cfg.tool_argument_weight == 2.5 and TrainConfig().tool_argument_weight == 1.0
    for bad in ("0.5", "heavy"):
        with pytest.raises(SystemExit):
            main([*argv, "--tool-name-weight", bad])
        assert "expected a number >= 1" in capsys.readouterr().err, bad
    assert cfg.warmup_steps == TrainConfig().warmup_steps
    assert _run_command([*argv, "--warmup-steps", "5"], monkeypatch)[0].warmup_steps == 5
    for bad in ("-1", "2.5", "few"):
        with pytest.raises(SystemExit):
            main([*argv, "--warmup-steps", bad])
        assert "expected a whole number >= 0" in capsys.readouterr().err, bad
    for bad, says in (("tools=0.3", "FAMILY one of addition"), ("tool:0.3", "FAMILY=WEIGHT"),
                      ("tool=lots", "must be a number"), ("tool=-1", ">= 0"),
                      (",".join(f"{f}=0" for f in data.DEFAULT_WEIGHTS), "every family a weight of 0")):
        with pytest.raises(SystemExit):
            main([*argv, "--mix", bad])
        assert says in capsys.readouterr().err, bad


@pytest.mark.parametrize("loss_positions", [False, True], ids=["every position", "loss positions"])
@pytest.mark.parametrize("bf16", [False, True])
def test_the_training_forward_traces_as_one_graph(bf16: bool, loss_positions: bool) -> None:
    """The compiled training step sees the whole forward: a graph break inside the layer loop makes dynamo skip the
    loop's frame (the run then goes eagerly, layer by layer, with a recompile per layer kind). Under bfloat16
    autocast, a CPU-feature check in the Mamba layer's products once did that on every CPU."""
    from model_helpers import tiny_model

    from phi4flash.model import LossPositions
    from phi4flash.training.train import _training_kernels

    native.ready()  # as the compiled step loads the kernels before tracing (a first load splits the graph)
    model = tiny_model().train()
    x = torch.randint(0, 100, (2, 24))
    kwargs = {"loss_positions": LossPositions.from_mask(_random_loss_mask(2, 24, 0))} if loss_positions else {}
    torch._dynamo.reset()
    with _training_kernels(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        explanation = torch._dynamo.explain(model)(x, **kwargs)
    assert explanation.graph_break_count == 0, [str(reason) for reason in explanation.break_reasons]
    assert explanation.graph_count == 1


@pytest.mark.parametrize("window", [None, 8])
def test_training_attention_path_matches_the_fused_one(window: int | None) -> None:
    g = torch.Generator().manual_seed(3)
    b, t, h, hkv, dh = 2, 40, 4, 2, 8
    q, k, v = (torch.randn(b, t, n, dh, generator=g) for n in (h, hkv, hkv))
    pos = torch.arange(t)[None].expand(b, t)
    mask = None if window is None else ops.attention_mask(pos, pos, None, window)
    args = (q, k, v, torch.tensor(0.3), 0.2, torch.ones(2 * dh), 1e-5, mask, mask is None)
    assert t >= ops.FUSED_MIN_QUERIES
    fused = ops.differential_attention(*args)
    from phi4flash.training.train import _training_kernels

    with _training_kernels():
        explicit = ops.differential_attention(*args)
    torch.testing.assert_close(explicit, fused, rtol=1e-5, atol=1e-5)
    assert ops.FUSED_MIN_QUERIES == 32  # restored


@pytest.mark.parametrize(("heads", "kv_heads", "length"),
                         [(4, 2, 40), (4, 2, 200), (8, 4, 250), (8, 2, 193), (4, 2, 3)])
def test_training_attention_equals_the_models_masked_attention(heads: int, kv_heads: int, length: int) -> None:
    """The training attention (the causal case, in query blocks from BLOCKED_MIN_QUERIES on) gives the model's
    masked attention and its gradients, for every head grouping (GQA of 2 and 4 query heads a kv head, one and two
    kv pairs)."""
    from phi4flash.training.attention import BLOCKED_MIN_QUERIES, training_attention

    g = torch.Generator().manual_seed(length)
    b, dh = 2, 8
    q, k, v = (torch.randn(b, length, n, dh, generator=g, dtype=torch.float64, requires_grad=True)
               for n in (heads, kv_heads, kv_heads))
    weight = torch.rand(2 * dh, generator=g, dtype=torch.float64, requires_grad=True)
    lam = torch.tensor(0.3, dtype=torch.float64)
    pos = torch.arange(length)[None].expand(b, length)
    expected = ops.differential_attention(q, k, v, lam, 0.2, weight, 1e-5, ops.attention_mask(pos, pos, None, None))
    got = training_attention(q, k, v, lam, 0.2, weight, 1e-5, None, causal=True)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    grad = torch.randn(expected.shape, generator=g, dtype=torch.float64)
    for want, have in zip(torch.autograd.grad(expected, (q, k, v, weight), grad),
                          torch.autograd.grad(got, (q, k, v, weight), grad), strict=True):
        torch.testing.assert_close(have, want, rtol=1e-10, atol=1e-10)
    assert (length >= BLOCKED_MIN_QUERIES) == (length in (200, 250, 193))  # both paths are covered


def test_training_kernels_swap_the_attention_in_and_back_out() -> None:
    from phi4flash import model as model_mod
    from phi4flash.training.attention import training_attention
    from phi4flash.training.train import _training_kernels

    assert model_mod.differential_attention is ops.differential_attention
    with _training_kernels():
        assert model_mod.differential_attention is training_attention
    assert model_mod.differential_attention is ops.differential_attention


@pytest.mark.parametrize("guarded", [False, True], ids=["training", "inductor's default"])
def test_training_compiles_sum_without_size_guards(guarded: bool) -> None:
    """Inside the training kernels a float32 sum over batch x length compiles once for sizes on both sides of
    inductor's 4,096-element chunking (and sums as well); with the guard (inductor's default), twice."""
    from torch._dynamo.utils import counters

    from phi4flash.training.train import _training_kernels

    def sum_of_squares(x: torch.Tensor) -> torch.Tensor:
        return (x * x).sum((0, 1))  # as the gradient of a per-channel weight sums over the whole batch

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(sum_of_squares, dynamic=True)
    with torch._inductor.config.patch(force_disable_caches=True), _training_kernels(guarded_sums=guarded):
        for batch, length in ((20, 50), (50, 100), (30, 100), (60, 150)):
            x = torch.randn(batch, length, 3, generator=torch.Generator().manual_seed(length))
            torch.testing.assert_close(compiled(x), sum_of_squares(x.double()).float(), rtol=1e-5, atol=0)
    assert counters["stats"]["unique_graphs"] == (2 if guarded else 1), counters["stats"]


def test_the_training_forward_of_a_long_batch_traces_as_one_graph() -> None:
    """The blocked training attention (a fixed count of blocks, no loop over the length) keeps the compiled
    step's one graph for batches longer than BLOCKED_MIN_QUERIES."""
    from model_helpers import tiny_model

    from phi4flash.training.attention import BLOCKED_MIN_QUERIES
    from phi4flash.training.train import _training_kernels

    native.ready()
    model = tiny_model(sliding_window=256).train()
    x = torch.randint(0, 100, (2, BLOCKED_MIN_QUERIES + 5))
    torch._dynamo.reset()
    with _training_kernels():
        explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0, [str(reason) for reason in explanation.break_reasons]
    assert explanation.graph_count == 1


def test_loss_positions_take_every_marked_token_once_row_by_row() -> None:
    from phi4flash.model import LossPositions

    mask = torch.tensor([[0, 1, 1, 0, 1], [0, 0, 0, 0, 0], [0, 0, 0, 1, 1]], dtype=torch.bool)
    kept = LossPositions.from_mask(mask)
    assert kept.tokens.tolist() == [[1, 2], [4, 13], [14, 1]]  # 5 tokens on a 3 x 2 grid, one of padding
    assert kept.real.tolist() == [[True, True], [True, True], [True, False]]
    assert kept.positions[0].tolist() == [1, 2, 4] and kept.positions[2].tolist() == [3, 4, 4]  # the last repeated
    assert kept.slots.shape == (3, 3)
    assert torch.equal(kept.slots.flatten()[kept.back[kept.real]], torch.arange(5))  # back undoes the slots
    targets = torch.arange(15).view(3, 5)
    assert kept.take(targets, -100).tolist() == [[1, 2], [4, 13], [14, -100]]


def _random_loss_mask(batch: int, length: int, seed: int) -> torch.Tensor:
    """Rows with a prompt, then trained tokens here and there; the second row has none, the last is trained from
    its middle to its end."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(batch, length, generator=g) < 0.6
    mask[:, :3] = False
    mask[1] = False
    mask[-1, length // 2:] = True
    return mask


@pytest.mark.parametrize("length", [6, 30], ids=["within the window", "beyond the window"])
@pytest.mark.parametrize("training_kernels", [False, True], ids=["model's attention", "training kernels"])
def test_the_forward_at_the_loss_positions_gives_the_whole_forwards_logits_and_gradients(
        length: int, training_kernels: bool) -> None:
    """The cross-decoder works per token, so running it (and the head) at the loss positions only changes no
    logit there and no gradient."""
    import contextlib

    from model_helpers import tiny_model

    from phi4flash.model import LossPositions
    from phi4flash.training.train import _training_kernels

    model = tiny_model().double().train()
    x = torch.randint(0, 100, (4, length), generator=torch.Generator().manual_seed(length))
    kept = LossPositions.from_mask(_random_loss_mask(4, length, length))
    weights = torch.randn(int(kept.real.sum()), 101, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    results = []
    with _training_kernels() if training_kernels else contextlib.nullcontext():
        for positions in (None, kept):
            model.zero_grad()
            logits = model(x) if positions is None else model(x, loss_positions=positions)
            picked = (logits.flatten(0, 1)[kept.tokens[kept.real]] if positions is None
                      else logits[kept.real])  # (N, V)
            (picked * weights).sum().backward()
            results.append((picked.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (whole, whole_grads), (kept_logits, kept_grads) = results
    torch.testing.assert_close(kept_logits, whole, rtol=1e-6, atol=1e-6)  # the head's logits are float32
    for name, grad in whole_grads.items():
        torch.testing.assert_close(kept_grads[name], grad, rtol=1e-9, atol=1e-10, msg=name)


def test_a_training_step_at_the_loss_positions_gives_the_same_loss_and_gradients() -> None:
    from model_helpers import tiny_model

    x = torch.randint(0, 100, (3, 20), generator=torch.Generator().manual_seed(2))
    mask = _random_loss_mask(3, 20, 3)
    assert int(mask.sum()) % 3, "the grid of loss positions should end in padding, which must carry no loss"
    y = torch.where(mask, torch.randint(0, 100, (3, 20), generator=torch.Generator().manual_seed(3)), -100)
    weights = mask.double() * (1 + torch.arange(20, dtype=torch.float64) % 3)
    seen = []
    for loss_positions_only in (False, True):
        model = tiny_model().double().train()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
        loss = train_step(model, model, optimizer, x, y, weights, bf16=False, grad_clip=1e9,
                          loss_positions_only=loss_positions_only)
        seen.append((loss, {n: p.grad for n, p in model.named_parameters()}))
    assert seen[0][0] == pytest.approx(seen[1][0], rel=1e-6)  # the loss is taken on float32 logits
    for name, grad in seen[0][1].items():
        torch.testing.assert_close(seen[1][1][name], grad, rtol=1e-5, atol=1e-8, msg=name)


def test_the_cross_attention_at_the_loss_positions_compiles_once_for_any_count_of_queries() -> None:
    """Batches whose most loss positions in a row fall on both sides of TRAINING_FUSED_MIN_QUERIES share one
    graph: the masked cross-attention at the loss positions takes the fused kernel whatever the count."""
    from model_helpers import tiny_model
    from torch._dynamo.utils import counters

    from phi4flash.model import LossPositions
    from phi4flash.training.train import TRAINING_FUSED_MIN_QUERIES, _training_kernels

    native.ready()
    model = tiny_model(sliding_window=512).train()
    forward = torch.compile(model, dynamic=True, backend="eager")
    torch._dynamo.reset()
    counters.clear()
    with _training_kernels(), torch.no_grad():
        for length, trained_from in ((300, 200), (320, 20)):  # 100 and 300 loss positions in a row
            mask = torch.zeros(2, length, dtype=torch.bool)
            mask[:, trained_from:] = True
            kept = LossPositions.from_mask(mask)
            assert (kept.slots.shape[1] >= TRAINING_FUSED_MIN_QUERIES) == (trained_from == 20)
            forward(torch.randint(0, 100, (2, length)), loss_positions=kept)
    assert counters["stats"]["unique_graphs"] == 1, counters["stats"]


def test_loss_positions_are_for_the_full_forward_only() -> None:
    from model_helpers import tiny_model

    from phi4flash.model import LossPositions

    model = tiny_model()
    x = torch.randint(0, 100, (1, 5))
    kept = LossPositions.from_mask(torch.ones(1, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="loss_positions is for the full forward"):
        model(x, cache=model.new_cache(1, 8), loss_positions=kept)
