"""Train the embedded tiny Phi4Flash on the synthetic math chats, on a CPU, with one command.

    python -m phi4flash.training.train [--steps N] [--out DIR] [--seed S]     (or: phi4flash train ...)

Steps: generate the training chats (data.py), train the byte-level BPE tokenizer on them, build a
small config of the real architecture (8 layers: every block kind once or twice), train with AdamW and
a warmup + cosine schedule, the loss only on the assistant turn, then write a checkpoint in the real
model's format (config.json, model.safetensors under the official names without the tied lm_head,
generation_config.json, tokenizer files) plus the loss curve (loss_curve.png) and train_summary.json.

Everything is seeded: the same command gives the same data, tokenizer and initial weights (CPU float
arithmetic may still differ slightly between machines).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import random
import re
import shlex
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

from ..cli import HelpFormatter
from ..model import LossPositions
from ..qkernels import cpu_multiplies_bfloat16
from ..tools import TOOL_CALL_CLOSE, TOOL_CALL_OPEN
from . import data as data_mod
from .attention import BLOCKED_MIN_QUERIES, training_attention
from .scan import training_scan
from .tokenizer_train import generation_config, model_config, save_tokenizer_files, train_tokenizer, write_json

EMBEDDED_DIR = Path(__file__).resolve().parent.parent / "embedded"
LOG_EVERY = 50  # steps between progress lines in the log
PYTHON_CALL = "phi4flash.training.train.train(cfg)"  # train_summary.json's command for a run started from Python

logger = logging.getLogger(__name__)

# The shipped model: 8 layers (Mamba, SWA, Mamba, SWA, memory Mamba, full attention, GMU, cross-attention).
# Sized for a 2-core CPU: 4.2M parameters (17 MB in float32), about 3 s per step of 32 chats on one thread.
# The window covers a whole chat, so the sliding-window layers can copy from the question or the tool list.
DEFAULT_MODEL: dict[str, Any] = {
    "hidden_size": 176,
    "intermediate_size": 704,
    "num_hidden_layers": 8,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "sliding_window": 512,
    "mamba_d_state": 8,
}


@dataclass
class TrainConfig:
    """Everything that defines a training run (saved in train_summary.json)."""

    steps: int = 9000  # the most optimizer steps (the data is made for this many; 93 minutes on 2 cores: 3,800-4,700)
    minutes: float | None = 85.0  # stop after this much training time; the schedule follows the clock (None: steps)
    batch_size: int = 32
    batch_tokens: int = 10240  # most tokens in a batch, padding included (long chats come fewer at a time)
    lr: float = 3e-3
    min_lr_ratio: float = 0.05
    warmup_steps: int = 80
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    seed: int = 0
    vocab_size: int = 1024
    tokenizer_examples: int = 20000
    threads: int = 2  # both cores of the 2-core machine it was made on
    # bfloat16 autocast (None: where the CPU multiplies bfloat16 in hardware, see qkernels.cpu_multiplies_bfloat16;
    # float32 elsewhere, where PyTorch's bfloat16 matrix products are 4-117x slower than float32's).
    bf16: bool | None = None
    # torch.compile the model's training forward and backward (three graphs for every batch shape; see
    # _compiled): its first steps also compile, inside the time budget.
    compile: bool = True
    model: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_MODEL))
    weights: dict[str, float] | None = None  # family mix; None means data.DEFAULT_WEIGHTS
    # Share of the tool chats that are sessions of several requests on one tool list, every reply trained
    # (data.generate's tool_sessions; 0 gives the data of the runs before it existed).
    tool_sessions: float = 0.0
    # Share of the chats without tools that carry an earlier exchange (data.generate's multi_turn): many tool
    # sessions with few plain follow-ups teach a model that a second question calls a tool even when none is listed.
    multi_turn: float = data_mod.MULTI_TURN_RATE
    # Weight in the loss of the tokens of the tool name a thought picks ("Weather: call get_weather.", "..., a sum,
    # with add."), the one decision of a tool chat that the rest copies; 1 weighs every trained token the same.
    tool_name_weight: float = 1.0
    # Weight in the loss of the tokens of a call's argument values (a city, a name, a description, an operand),
    # which the call copies from the question; 1 weighs every trained token the same.
    tool_argument_weight: float = 1.0
    # Continue from this checkpoint (a folder or "embedded"): its tokenizer, sizes and weights instead of new ones,
    # so that a run can teach a trained model more without paying again for what it knows.
    init_from: str | None = None


@dataclass
class TrainResult:
    """What a run produced."""

    out_dir: Path
    losses: list[float]
    seconds: float
    parameters: int
    summary: dict[str, Any]


# Masked attention calls of this many queries or more go through SDPA; the training attention's own threshold, so
# that the compiled step keeps two graphs (short and long batches) instead of three.
TRAINING_FUSED_MIN_QUERIES = BLOCKED_MIN_QUERIES


def trains_in_bfloat16(bf16: bool | None) -> bool:
    """Whether a run trains under bfloat16 autocast: ``bf16`` when given; None picks bfloat16 where the CPU
    multiplies it in hardware (:func:`~phi4flash.qkernels.cpu_multiplies_bfloat16`), float32 elsewhere."""
    return cpu_multiplies_bfloat16() if bf16 is None else bf16


def precision_name(bf16: bool) -> str:
    """How logs, train_summary.json and the benchmarks name the precision a step runs in."""
    return "bfloat16 autocast" if bf16 else "float32"


@contextlib.contextmanager
def _sums_without_size_guards() -> Iterator[None]:
    """While compiling, sum float32 reductions over batch x length in inductor's 4,096-element chunks whatever
    the size, instead of asking whether the batch's size passes 4,096 elements.

    Inductor's C++ backend chunks a float32 sum only above 4,096 elements, and under dynamic shapes that
    question becomes a guard on batch x length: every attention branch then compiles twice (batches of at most
    4,096 tokens and more; the gradients of the per-channel weights sum over every token). Chunking those sums
    always (what it does for any large sum) keeps one graph per branch: 3 cold compiles instead of 6. Sums over
    one dimension keep inductor's choice: chunking the ones over the length alone too made steps 5% slower
    (benchmarks/bench_train_graphs.py). Without the private hook (another torch), compiles are as before.
    """
    try:
        import sympy
        from torch._inductor.codegen import cpp
    except ImportError:  # pragma: no cover - a torch without inductor's C++ backend
        yield
        return
    original = getattr(cpp.CppKernel, "need_use_acc_helper", None)
    if original is None:  # pragma: no cover - another torch
        yield
        return

    def need_use_acc_helper(self: Any, reduction_type: str, dtype: torch.dtype, use_scalar: bool) -> bool:
        if reduction_type == "sum" and dtype == torch.float:
            size = sympy.sympify(math.prod(self.call_ranges[self.reduction_depth:]))
            if len(size.free_symbols) >= 2:  # batch x length
                return True
        return original(self, reduction_type, dtype, use_scalar)

    cpp.CppKernel.need_use_acc_helper = need_use_acc_helper
    try:
        yield
    finally:
        cpp.CppKernel.need_use_acc_helper = original


@contextlib.contextmanager
def _training_kernels(guarded_sums: bool = False) -> Iterator[None]:
    """Use :func:`training_scan` and :func:`training_attention` inside the model while training; the masked
    calls that the training attention leaves to the model (the sliding-window layers on batches longer than the
    window) take the explicit matmuls below :data:`TRAINING_FUSED_MIN_QUERIES` queries and SDPA from there on.

    The model's chunked scan is built for long prompts at inference; for training chats of a few hundred
    tokens on a CPU it is ~20x slower than this recurrence. The training attention (each head group at its own
    width, causal query blocks) took 0.51-0.65x the time of SDPA's fused kernel at 256-512 tokens, forward and
    backward, and a training step 0.88x (benchmarks/bench_train_attention.py, 2026-12-04). For the masked calls,
    SDPA's fused CPU kernel (forward and backward) is slower than the explicit matmuls for batches of about 128
    tokens and faster from about 200 on (2026-12-01: 1.15 vs 1.05 s a step at 80 x 128 tokens, 1.05 vs 1.13 s
    at 40 x 256, 1.19 vs 1.6 s at 20 x 512). All are swapped in and back out.

    Compiles inside it sum without size guards (:func:`_sums_without_size_guards`) unless ``guarded_sums``.
    """
    from .. import model as model_mod
    from .. import ops

    # The model module imports the scan under these names (the dispatching one first), and the attention.
    swaps: dict[str, Callable[..., Any]] = {
        n: training_scan for n in ("selective_scan_auto", "selective_scan") if hasattr(model_mod, n)}
    swaps["differential_attention"] = training_attention
    saved = {n: getattr(model_mod, n) for n in swaps}
    fused = ops.FUSED_MIN_QUERIES
    for n, fn in swaps.items():
        setattr(model_mod, n, fn)
    ops.FUSED_MIN_QUERIES = TRAINING_FUSED_MIN_QUERIES
    try:
        with contextlib.nullcontext() if guarded_sums else _sums_without_size_guards():
            yield
    finally:
        for n, fn in saved.items():
            setattr(model_mod, n, fn)
        ops.FUSED_MIN_QUERIES = fused


# ----------------------------------------------------------------------------------------------------
# Data to batches.
# ----------------------------------------------------------------------------------------------------


class Encoded(NamedTuple):
    """A chat as token ids, the ``[start, end)`` spans of the ids that carry the loss, the spans of the
    tool names its thoughts pick (see :data:`TrainConfig.tool_name_weight`) and the spans of its calls' argument
    values (:data:`TrainConfig.tool_argument_weight`)."""

    ids: list[int]
    spans: list[tuple[int, int]]
    tool_names: Sequence[tuple[int, int]] = ()
    tool_arguments: Sequence[tuple[int, int]] = ()


_CALLED_NAME = re.compile(re.escape(TOOL_CALL_OPEN) + r'\[\{"name": "([^"]+)"')
_CALL = re.compile(re.escape(TOOL_CALL_OPEN) + "(.*?)" + re.escape(TOOL_CALL_CLOSE), re.DOTALL)


def argument_values(text: str) -> list[tuple[int, int]]:
    """The ``[start, end)`` character spans of the argument values of the calls in ``text``, as
    :func:`phi4flash.training.toolchat.call_text` writes them (a string's quotes left out).

    Calls that are not JSON, or not written that way, give no spans.
    """
    out = []
    for call in _CALL.finditer(text):
        try:
            payload = json.loads(call.group(1))
        except json.JSONDecodeError:
            continue
        cursor = call.start(1)
        for item in payload if isinstance(payload, list) else []:
            arguments = item.get("arguments") if isinstance(item, dict) else None
            for key, value in (arguments.items() if isinstance(arguments, dict) else ()):
                key_written, written = json.dumps(key, ensure_ascii=False) + ": ", json.dumps(value, ensure_ascii=False)
                start = text.find(key_written + written, cursor, call.end(1))
                if start < 0:
                    continue
                start += len(key_written)
                cursor = start + len(written)
                quoted = isinstance(value, str)
                out.append((start + quoted, cursor - quoted))
    return out


def _token_span(offsets: Sequence[tuple[int, int]], start: int, end: int) -> tuple[int, int] | None:
    """The ``[first, last + 1)`` token indices whose characters overlap ``[start, end)`` (None: none do)."""
    picked = [i for i, (a, b) in enumerate(offsets) if a < end and b > start]
    return (picked[0], picked[-1] + 1) if picked else None


def encode_example(tok: Tokenizer, ex: data_mod.Example) -> Encoded:
    """Token ids of prompt + completion + ``<|end|>``, the ``[start, end)`` spans of the ids that carry the
    loss (the completion, and every earlier assistant turn too when ``ex.trained_history`` is set), and in those
    turns the spans of the tool name that the thought picks before the call names it and of the calls' argument
    values.

    The text is encoded in pieces cut at special tokens (``<|assistant|>``, ``<|end|>``), which the tokenizer
    never merges across, so the ids are those of the whole text.
    """
    ids: list[int] = []
    spans: list[tuple[int, int]] = []
    names: list[tuple[int, int]] = []
    values: list[tuple[int, int]] = []

    def trained(text: str) -> None:
        encoding = tok.encode(text)
        spans.append((len(ids), len(ids) + len(encoding.ids)))
        call = _CALLED_NAME.search(text)
        # the last mention before the call: a thought may name the tool of the step before ("add gave 7, ...")
        start = text.rfind(call.group(1), 0, call.start()) if call else -1
        picks = [(start, start + len(call.group(1)))] if call and start >= 0 else []
        # The thought picks the tool (the call then copies the name); the arguments are copied from the question.
        for into, char_spans in ((names, picks), (values, argument_values(text))):
            for a, b in char_spans:
                token_span = _token_span(encoding.offsets, a, b)
                if token_span:
                    into.append((len(ids) + token_span[0], len(ids) + token_span[1]))
        ids.extend(encoding.ids)

    pending = ""  # prompt text not encoded yet
    for m in ex.messages:
        if ex.trained_history and m["role"] == "assistant":
            ids.extend(tok.encode(pending + "<|assistant|>").ids)
            trained(m["content"] + "<|end|>")
            pending = ""
        else:
            pending += data_mod.render_message(m)
    ids.extend(tok.encode(pending + "<|assistant|>").ids)
    trained(ex.completion + "<|end|>")
    return Encoded(ids, spans, names, values)


class Batch(NamedTuple):
    """One optimizer step's chats: ids, next-token targets (-100: no loss) and, when some tokens count more,
    each target's weight in the loss (None: all count the same)."""

    ids: torch.Tensor  # (B, T)
    targets: torch.Tensor  # (B, T)
    weights: torch.Tensor | None = None  # (B, T), 0 where targets is -100


def make_batches(encoded: Sequence[Encoded], batch_size: int, pad_id: int, seed: int,
                 max_tokens: int | None = None, tool_name_weight: float = 1.0,
                 tool_argument_weight: float = 1.0) -> list[Batch]:
    """Group chats of similar length (less padding), right-pad, and shuffle the batch order.

    A batch holds at most ``batch_size`` chats and, when ``max_tokens`` is given, at most that many tokens
    padding included, so a batch of long chats has fewer of them: every step costs about the same, and the
    longest chats do not blow up the memory.

    Args:
        encoded: the chats (:func:`encode_example`).
        tool_name_weight: the weight in the loss of the tool names that the thoughts pick (``Encoded.tool_names``);
            at 1 every trained token counts the same and the batches carry no weights.
        tool_argument_weight: the same for the argument values of the calls (``Encoded.tool_arguments``).

    Returns:
        The batches: targets are -100 outside the chats' loss spans (the prompt, untrained turns) and on
        the padding. Right padding needs no attention mask: causal layers never look ahead, and padded positions
        carry no loss.
    """
    rng = random.Random(seed)
    order = list(range(len(encoded)))
    rng.shuffle(order)
    window = batch_size * 50
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start:start + window], key=lambda i: len(encoded[i][0]))
        groups: list[list[int]] = [[]]
        for i in chunk:
            rows = groups[-1]
            full = len(rows) == batch_size or (
                max_tokens is not None and rows and (len(rows) + 1) * len(encoded[i][0]) > max_tokens)
            if full:
                groups.append([])
            groups[-1].append(i)
        if max_tokens is None and len(groups[-1]) < batch_size:
            groups.pop()  # fixed-size batches only
        for group in groups:
            rows = [encoded[i] for i in group]
            length = max(len(row.ids) for row in rows)
            x = torch.full((len(rows), length), pad_id, dtype=torch.long)
            y = torch.full((len(rows), length), -100, dtype=torch.long)
            for r, row in enumerate(rows):
                x[r, :len(row.ids)] = torch.tensor(row.ids)
                # Targets are the next tokens: a span's first token is the target at the position before it.
                for a, b in row.spans:
                    y[r, a - 1:b - 1] = torch.tensor(row.ids[a:b])
            w = None
            if tool_name_weight != 1 or tool_argument_weight != 1:
                w = (y != -100).float()
                for r, row in enumerate(rows):
                    for weight, token_spans in ((tool_argument_weight, row.tool_arguments),
                                                (tool_name_weight, row.tool_names)):
                        for a, b in token_spans:
                            w[r, a - 1:b - 1] = weight
            batches.append(Batch(x, y, w))
    rng.shuffle(batches)
    return batches


def lr_at(step: int, cfg: TrainConfig, progress: float | None = None) -> float:
    """Linear warmup over ``warmup_steps``, then cosine decay to ``min_lr_ratio * lr``.

    The decay follows ``progress`` (the share of the time budget spent) when given, else the steps done.
    """
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if progress is None:
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay the matrices only; norms, biases, A_log, D and the lambdas stay undecayed."""
    decay, rest = [], []
    for _, p in model.named_parameters():
        (decay if p.dim() >= 2 else rest).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


# ----------------------------------------------------------------------------------------------------
# The run.
# ----------------------------------------------------------------------------------------------------


def train(cfg: TrainConfig, out_dir: str | Path, *, progress: bool = False, command: str | None = None
          ) -> TrainResult:
    """Run one training and write the checkpoint into ``out_dir``.

    Args:
        cfg: The run's settings (``cfg.steps == 0`` writes a random-weight checkpoint).
        out_dir: Checkpoint folder (created if needed; existing checkpoint files are replaced).
        progress: Show a tqdm progress bar.
        command: The command line that asked for the run, kept in train_summary.json (default: a call from
            Python, whose settings are the summary's ``train_config``).

    Returns:
        The losses per step, wall time and a summary (also written to train_summary.json).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        return _train(cfg, out, progress, command or PYTHON_CALL)
    finally:
        torch.set_num_threads(threads)


def _train(cfg: TrainConfig, out: Path, progress: bool, command: str) -> TrainResult:
    from ..config import Phi4FlashConfig
    from ..model import Phi4FlashForCausalLM

    torch.manual_seed(cfg.seed)
    started = time.perf_counter()
    bf16 = trains_in_bfloat16(cfg.bf16)
    logger.info("training in %s", precision_name(bf16))

    n_examples = cfg.steps * cfg.batch_size if cfg.init_from else max(cfg.steps * cfg.batch_size,
                                                                          cfg.tokenizer_examples)
    examples = data_mod.generate(n_examples, seed=cfg.seed, split="train", weights=cfg.weights,
                                 tool_sessions=cfg.tool_sessions, multi_turn=cfg.multi_turn)
    source_summary = None
    if cfg.init_from:
        tok, config_dict, model, source_summary = _start_from(cfg.init_from)
    else:
        texts = (data_mod.render_prompt(ex.messages) + ex.completion + "<|end|>"
                 for ex in examples[:cfg.tokenizer_examples])
        tok = train_tokenizer(texts, cfg.vocab_size)
        config_dict = model_config(tok, **cfg.model)
        model = Phi4FlashForCausalLM(Phi4FlashConfig.from_dict(config_dict))
        model.init_weights(std=0.02)
    n_params = sum(p.numel() for p in model.parameters())
    pad_id = tok.token_to_id("<|endoftext|>")
    encoded = [encode_example(tok, ex) for ex in examples[:cfg.steps * cfg.batch_size]]
    batches = make_batches(encoded, cfg.batch_size, pad_id, cfg.seed, cfg.batch_tokens,
                           cfg.tool_name_weight, cfg.tool_argument_weight)[:cfg.steps]

    optimizer = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8)
    losses: list[float] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(batches), desc="train", unit="step", dynamic_ncols=True)
    model.train()
    forward = _compiled(model) if cfg.compile else model
    train_started = time.perf_counter()
    with _training_kernels():
        warm_done = None  # when the warmup ended: the time budget's decay runs from there
        for step, (x, y, w) in enumerate(batches):
            progress = None
            if cfg.minutes is not None:
                now = time.perf_counter()
                if now - train_started >= cfg.minutes * 60:
                    break
                if step == cfg.warmup_steps:
                    warm_done = now
                if warm_done is not None:
                    progress = (now - warm_done) / max(1.0, cfg.minutes * 60 - (warm_done - train_started))
            lr = lr_at(step, cfg, progress)
            for group in optimizer.param_groups:
                group["lr"] = lr
            try:
                loss = train_step(forward, model, optimizer, x, y, w, bf16=bf16, grad_clip=cfg.grad_clip)
            except Exception as err:  # noqa: BLE001 - no compiler, an unsupported op: train eagerly, say why
                if forward is model:
                    raise
                logger.warning("training step not compiled (%s: %s); training eagerly", type(err).__name__,
                               str(err).strip().splitlines()[0][:200] if str(err).strip() else "")
                forward = model
                loss = train_step(model, model, optimizer, x, y, w, bf16=bf16, grad_clip=cfg.grad_clip)
            losses.append(loss)
            if (step + 1) % LOG_EVERY == 0:
                recent = losses[-LOG_EVERY:]
                logger.info("step %d/%d loss %.4f lr %.2e %.0f s", step + 1, len(batches), sum(recent) / len(recent),
                            lr, time.perf_counter() - train_started)
            if bar is not None:
                recent = losses[-20:]
                bar.set_postfix(loss=f"{sum(recent) / len(recent):.4f}", lr=f"{lr:.2e}")
                bar.update(1)
    if bar is not None:
        bar.close()
    model.eval()
    train_seconds = time.perf_counter() - train_started

    save_all(model, tok, config_dict, out)
    summary = {
        "command": command,
        "train_config": asdict(cfg),
        "parameters": n_params,
        "steps": len(losses),
        "examples": sum(len(b.ids) for b in batches[:len(losses)]),
        "tokens": sum(b.ids.numel() for b in batches[:len(losses)]),
        "train_seconds": round(train_seconds, 1),
        "total_seconds": round(time.perf_counter() - started, 1),
        "final_loss": _tail_mean(losses),
        "first_loss": losses[0] if losses else None,
        "compiled": forward is not model,
        "precision": precision_name(bf16),
        "torch": torch.__version__,
    }
    if cfg.init_from:  # the run it continues, so that the checkpoint keeps its whole history
        summary["continued_from"] = source_summary
    if losses:
        plot_losses(losses, out / "loss_curve.png")
    write_json(out / "train_summary.json", summary)
    return TrainResult(out, losses, train_seconds, n_params, summary)


def train_step(forward: Callable[..., torch.Tensor], model: torch.nn.Module,
               optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
               weights: torch.Tensor | None = None, *, bf16: bool = True, grad_clip: float = 1.0,
               loss_positions_only: bool = True) -> float:
    """One optimizer step of ``phi4flash train`` (the benchmarks time this same function).

    Args:
        forward: ``model`` or its compiled forward (:func:`_compiled`).
        model: the model whose parameters ``optimizer`` updates.
        optimizer: the optimizer; its learning rate is set by the caller.
        x: ``(batch, length)`` token ids.
        y: ``(batch, length)`` next-token targets, -100 where no loss is taken (outside the assistant turn).
        weights: ``(batch, length)`` weight of each target in the loss, or None for the plain mean.
        bf16: run the forward under bfloat16 autocast.
        grad_clip: the gradients' largest total norm.
        loss_positions_only: run the cross-decoder and the head at the targets' positions only (the same
            logits there, less work: :class:`phi4flash.model.LossPositions`); False runs them everywhere.

    Returns:
        The batch's mean cross-entropy over its targets, unweighted (comparable between runs).
    """
    trained = y != -100
    kept = LossPositions.from_mask(trained) if loss_positions_only and bool(trained.any()) else None
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        # (batch, length, vocab), or (batch, about N / batch, vocab) at the N loss positions
        logits = forward(x) if kept is None else forward(x, loss_positions=kept)
    targets = (y if kept is None else kept.take(y, -100)).reshape(-1)
    w = None if weights is None else (weights if kept is None else kept.take(weights, 0)).reshape(-1)
    flat = logits.float().view(-1, logits.shape[-1])  # (positions, vocab)
    if w is None:
        loss = F.cross_entropy(flat, targets, ignore_index=-100)
        reported = loss
    else:
        per_token = F.cross_entropy(flat, targets, ignore_index=-100, reduction="none")  # 0 where y is -100
        loss = (per_token * w).sum() / w.sum()
        reported = per_token.detach().sum() / (targets != -100).sum()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    return reported.item()


def _compiled(model: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """``model`` under torch.compile with dynamic shapes, where static shapes would compile once per batch length.

    Three graphs take every batch, one per attention branch (under the training attention's 192 queries, up to
    the 512-token window, beyond it), inside :func:`_training_kernels` (outside it, each branch twice: both sides
    of inductor's 4,096-element split of its sums). The model's attention modules stop splitting long batches into
    query blocks (see below).
    """
    from .. import native

    native.ready()  # the kernels' first load must not happen while dynamo traces (it would split the graph)
    for module in model.modules():
        # Attention over more queries than this goes block by block in a Python loop, which would fix each graph's
        # length; one masked call takes any length (a training batch's (T, T) mask is small).
        if hasattr(module, "query_block"):
            module.query_block = sys.maxsize
    return torch.compile(model, dynamic=True)


def _start_from(source: str) -> tuple[Tokenizer, dict[str, Any], torch.nn.Module, dict[str, Any] | None]:
    """The tokenizer, config.json, float32 weights (trainable) and train_summary.json (None when it has none) of
    the checkpoint ``source`` continues from."""
    from ..weights import load_model, resolve_checkpoint

    path = resolve_checkpoint(source)
    if not (path / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{path} has no tokenizer.json: continue from a checkpoint that phi4flash train wrote")
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    config_dict = json.loads((path / "config.json").read_text(encoding="utf-8"))
    model = load_model(path, dtype=torch.float32)
    for param in model.parameters():
        param.requires_grad_(True)
    summary = path / "train_summary.json"
    return tok, config_dict, model, json.loads(summary.read_text(encoding="utf-8")) if summary.is_file() else None


def _tail_mean(losses: Sequence[float], n: int = 50) -> float | None:
    tail = list(losses[-n:])
    return round(sum(tail) / len(tail), 5) if tail else None


def save_all(model: torch.nn.Module, tok: Tokenizer, config_dict: dict[str, Any], out: Path) -> None:
    """Write the checkpoint: weights (official names, no tied lm_head), config, generation config, tokenizer."""
    from safetensors.torch import save_file

    try:
        from ..weights import save_checkpoint
    except ImportError:  # the model code predates weights.py: write the same file directly
        tensors = {k: v.detach().float().contiguous().clone() for k, v in model.state_dict().items()
                   if k != "lm_head.weight"}
        save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    else:
        save_checkpoint(model, out, dtype=torch.float32)
    # Our own config.json: the real checkpoint's key set (save_checkpoint's has extra derived keys).
    write_json(out / "config.json", config_dict)
    write_json(out / "generation_config.json", generation_config(tok))
    save_tokenizer_files(tok, out)
    for path in out.iterdir():
        if path.is_file():
            path.chmod(0o644)  # safetensors writes 0600; the files ship in the wheel and must be readable


def plot_losses(losses: Sequence[float], path: Path) -> None:
    """Save the loss per step and its moving average as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = max(1, len(losses) // 50)
    smooth = [sum(losses[max(0, i - k + 1):i + 1]) / len(losses[max(0, i - k + 1):i + 1]) for i in range(len(losses))]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(losses, color="#9bbbd9", linewidth=0.8, label="loss per step")
    ax.plot(smooth, color="#1f4e79", linewidth=1.6, label=f"moving average ({k} steps)")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy on the assistant turn (nats/token)")
    ax.set_title("phi4flash embedded tiny model: training loss")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def build_parser(prog: str = "phi4flash train") -> argparse.ArgumentParser:
    """The ``phi4flash train`` options (also ``python -m phi4flash.training.train``)."""
    defaults = TrainConfig()
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("--steps", type=int, default=defaults.steps,
                        help="the most optimizer steps (0: random weights)")
    parser.add_argument("--minutes", type=float, default=defaults.minutes,
                        help="training time; the learning-rate schedule follows the clock (0: run all --steps, "
                             "a schedule by steps, the same run on any machine)")
    parser.add_argument("--out", default=None,
                        help="checkpoint folder (default: a new phi4flash-embedded-DATE-TIME folder here)")
    parser.add_argument("--overwrite-embedded", action="store_true",
                        help="allow --out to be the shipped model's folder (phi4flash/embedded)")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="seed of the data, tokenizer and weights")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help="most chats per optimizer step")
    parser.add_argument("--lr", type=float, default=defaults.lr, help="peak learning rate (warmup, then cosine)")
    parser.add_argument("--warmup-steps", type=_count, default=defaults.warmup_steps,
                        help="steps of linear warmup to the peak learning rate (a short continuation wants few)")
    parser.add_argument("--threads", type=int, default=defaults.threads, help="torch threads")
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                        help="train under bfloat16 autocast, or in float32 (--no-bf16); default: bfloat16 where the "
                             "CPU multiplies it natively (AVX512-BF16 or AMX), float32 elsewhere")
    parser.add_argument("--no-compile", action="store_true",
                        help="train the model eagerly instead of through torch.compile (no compiler needed)")
    parser.add_argument("--hidden-size", type=int, default=DEFAULT_MODEL["hidden_size"],
                        help="model width (the MLP is 4x)")
    parser.add_argument("--layers", type=int, default=DEFAULT_MODEL["num_hidden_layers"], help="decoder layers")
    parser.add_argument("--vocab-size", type=int, default=defaults.vocab_size, help="tokenizer ids")
    parser.add_argument("--init-from", default=None,
                        help="continue from this checkpoint ('embedded' or a folder): its tokenizer, sizes and "
                             "weights (--hidden-size, --layers and --vocab-size are then ignored); use a --seed "
                             "other than its run's for new chats, and a lower --lr")
    parser.add_argument("--mix", type=parse_mix, default=None, metavar="FAMILY=WEIGHT,...",
                        help="change the shares of some families in the training mix (the others keep "
                             "data.DEFAULT_WEIGHTS), e.g. tool=0.3,percent=0.15")
    parser.add_argument("--tool-sessions", type=_share, default=defaults.tool_sessions, metavar="SHARE",
                        help="share of the tool chats that are sessions of several requests on one tool list, "
                             "every reply trained (0 to 1)")
    parser.add_argument("--multi-turn", type=_share, default=defaults.multi_turn, metavar="SHARE",
                        help="share of the chats without tools that carry an earlier exchange before the "
                             "question (0 to 1)")
    parser.add_argument("--tool-name-weight", type=_weight, default=defaults.tool_name_weight, metavar="W",
                        help="weight in the loss of the tool name that a thought picks before a call "
                             "(1: every trained token the same)")
    parser.add_argument("--tool-argument-weight", type=_weight, default=defaults.tool_argument_weight, metavar="W",
                        help="weight in the loss of the argument values of a call, copied from the question "
                             "(1: every trained token the same)")
    return parser


def _number_type(expected: str, fits: Callable[[float], bool]) -> Callable[[str], float]:
    """An argparse type: a number for which ``fits`` holds, else an error saying ``expected``."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: expected {expected}") from None
        if not fits(value):
            raise argparse.ArgumentTypeError(f"{text!r}: expected {expected}")
        return value

    return parse


_share = _number_type("a number between 0 and 1", lambda value: 0 <= value <= 1)
_weight = _number_type("a number >= 1", lambda value: value >= 1)  # a loss weight


def _count(text: str) -> int:
    """An argparse type: a whole number >= 0."""
    if not text.strip().isdigit():
        raise argparse.ArgumentTypeError(f"{text!r}: expected a whole number >= 0")
    return int(text)


def parse_mix(text: str) -> dict[str, float]:
    """``"tool=0.3,percent=0.15"`` -> the default family mix with those shares changed.

    Raises:
        argparse.ArgumentTypeError: an unknown family, a missing ``=`` or a weight that is not a number >= 0.
    """
    weights = dict(data_mod.DEFAULT_WEIGHTS)
    for item in filter(None, (part.strip() for part in text.split(","))):
        family, sep, value = item.partition("=")
        if not sep or family not in weights:
            raise argparse.ArgumentTypeError(
                f"{item!r}: expected FAMILY=WEIGHT with FAMILY one of {', '.join(weights)}")
        try:
            weights[family] = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{item!r}: the weight must be a number") from None
        if not weights[family] >= 0:
            raise argparse.ArgumentTypeError(f"{item!r}: the weight must be >= 0")
    if not any(weights.values()):
        raise argparse.ArgumentTypeError("the mix gives every family a weight of 0")
    return weights


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``phi4flash train [--minutes M] [--out DIR] [--seed S]``."""
    parser = build_parser()
    args = parser.parse_args(list(argv) if argv is not None else None)
    out = Path(args.out) if args.out else Path.cwd() / time.strftime("phi4flash-embedded-%Y%m%d-%H%M%S")
    if out.resolve() == EMBEDDED_DIR.resolve() and not args.overwrite_embedded:
        parser.error(f"--out {out} is the shipped model's folder; add --overwrite-embedded to replace it")
    model = dict(DEFAULT_MODEL, hidden_size=args.hidden_size, intermediate_size=4 * args.hidden_size,
                 num_hidden_layers=args.layers)
    cfg = TrainConfig(steps=args.steps, minutes=args.minutes or None, seed=args.seed, batch_size=args.batch_size,
                      lr=args.lr, warmup_steps=args.warmup_steps, threads=args.threads, bf16=args.bf16,
                      compile=not args.no_compile, model=model,
                      vocab_size=args.vocab_size, init_from=args.init_from, weights=args.mix,
                      tool_sessions=args.tool_sessions, multi_turn=args.multi_turn,
                      tool_name_weight=args.tool_name_weight, tool_argument_weight=args.tool_argument_weight)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    command = shlex.join(["phi4flash", "train", *(argv if argv is not None else sys.argv[1:])])
    result = train(cfg, out, progress=True, command=command)
    s = result.summary
    print(f"trained {s['parameters']:,} parameters for {s['steps']} steps ({s['examples']:,} chats) "  # noqa: T201
          f"in {s['train_seconds'] / 60:.1f} min; loss {s['first_loss']} -> {s['final_loss']}")
    print(f"wrote {result.out_dir} (loss curve: {result.out_dir / 'loss_curve.png'})")  # noqa: T201
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
