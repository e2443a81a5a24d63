"""Load a Phi4Flash checkpoint (a local folder, a hub id, or "embedded") into the native model, and save one.

The model is built on the meta device and filled tensor by tensor, so peak memory stays near one copy
of the weights. Loading is strict: missing, unexpected or mis-shaped tensors fail with a list of them.
Never ``trust_remote_code``: only config.json, safetensors and tokenizer files are read.
"""

from __future__ import annotations

import ctypes
import functools
import json
import logging
import os
import shutil
import sys
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from .config import Phi4FlashConfig
from .model import FP32_PARAMETERS, Phi4FlashForCausalLM
from .ops import acc_dtype
from .quant import (
    QuantizationError,
    QuantSpec,
    checkpoint_modules,
    expected_quantized_tensors,
    model_weight_bytes,
    quantize_modules_,
    quantized_shapes,
)
from .quant import check_device as check_quantized_device

logger = logging.getLogger(__name__)

EMBEDDED = "embedded"
EMBEDDED_DIR = Path(__file__).parent / "embedded"
# Only what the native code reads: no *.py (no remote code), no pytorch_model.bin.
CHECKPOINT_PATTERNS = [
    "config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
    "model-*.safetensors", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja",
]
_DTYPES = {"float32": torch.float32, "float": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
           "float64": torch.float64, "double": torch.float64}


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
                       "I8": torch.int8, "U8": torch.uint8, "I32": torch.int32, "I64": torch.int64}


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message lists what is wrong and how to fix it."""


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """'bfloat16' / 'bf16' / torch.bfloat16 ... -> torch.dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[str(dtype).replace("torch.", "")]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use one of float32, bfloat16, float16, float64") from None


def resolve_checkpoint(source: str | os.PathLike[str], *, revision: str | None = None,
                       token: str | bool | None = None) -> Path:
    """Return a local folder for ``source``: "embedded", a local directory, or a hub id (downloaded).

    Hub downloads use huggingface_hub (its progress bars, cache, ``HF_HUB_OFFLINE`` and token) and fetch
    only the files the native code reads.
    """
    if str(source) == EMBEDDED:
        if not (EMBEDDED_DIR / "config.json").exists():
            raise CheckpointError(f"the embedded checkpoint is missing from {EMBEDDED_DIR}; reinstall phi4flash or "
                                  "remake it with `python -m phi4flash.training.train`")
        return EMBEDDED_DIR
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise CheckpointError(f"{path} has no config.json: point at a Phi4Flash checkpoint folder")
        return path
    text = str(source)
    if path.exists() or text.startswith((".", "/", "~")) or text.count("/") != 1:
        raise CheckpointError(f"{text!r} is neither a checkpoint folder nor a hub id like "
                              "'microsoft/Phi-4-mini-flash-reasoning' (or 'embedded' for the built-in tiny model)")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        return Path(snapshot_download(text, revision=revision, token=token, allow_patterns=CHECKPOINT_PATTERNS))
    except GatedRepoError as err:
        raise CheckpointError(f"{text} is gated: accept its terms on the hub and pass token=... ({err})") from err
    except RepositoryNotFoundError as err:
        raise CheckpointError(f"unknown model id {text!r} on the hub; check the spelling, or pass a local folder "
                              "(private repos need token=...)") from err
    except RevisionNotFoundError as err:
        raise CheckpointError(f"revision {revision!r} not found for {text}") from err
    except LocalEntryNotFoundError as err:
        raise CheckpointError(f"{text} is not in the local cache and the hub cannot be reached (offline mode "
                              "or no network); download it once online, or pass a local folder") from err


def _open_weights(file: Path) -> object:
    """``safe_open`` that names a damaged, truncated or missing file and says what to do about it."""
    try:
        return safe_open(file, framework="pt", device="cpu")
    except FileNotFoundError:
        raise CheckpointError(f"{file} is missing: the checkpoint's index lists it; download the checkpoint again "
                              "(or copy the whole folder)") from None
    except (SafetensorError, OSError) as err:
        size = file.stat().st_size if file.exists() else 0
        raise CheckpointError(f"{file} ({size:,} bytes) is damaged or incomplete, probably an interrupted download "
                              f"or copy ({err}); delete it and download it again (for a hub model, "
                              "`hf download <id> --force-download`)") from None


def _weight_files(path: Path) -> dict[str, Path]:
    """tensor name -> safetensors file, via the index when the checkpoint is sharded."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
        return {name: path / file for name, file in weight_map.items()}
    single = path / "model.safetensors"
    if not single.exists():
        raise CheckpointError(f"{path} has neither model.safetensors nor model.safetensors.index.json")
    with _open_weights(single) as f:  # type: ignore[attr-defined]
        return {name: single for name in f.keys()}  # noqa: SIM118 - safe_open has no __iter__


def expected_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Checkpoint tensor names and shapes the model needs (tied lm_head excluded)."""
    names = {}
    seen: set[int] = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            continue
        seen.add(id(param))
        names[name] = tuple(param.shape)
    return names


def load_model(source: str | os.PathLike[str], *, dtype: str | torch.dtype | None = None,
               device: str | torch.device | None = None, revision: str | None = None,
               token: str | bool | None = None, quantize: str | QuantSpec | None = None) -> Phi4FlashForCausalLM:
    """Load a Phi4Flash checkpoint into the native model.

    Args:
        source: a checkpoint folder, a hub id ("microsoft/Phi-4-mini-flash-reasoning"), or "embedded".
        dtype: model (activation) dtype; default: the checkpoint's ``torch_dtype``, or bfloat16 for
            quantized weights. A_log and the lambdas stay float32.
        device: default "cpu".
        revision, token: passed to the hub download.
        quantize: "int8", "int4" or "int4-g<group size>": quantize the linear layers while loading, one
            tensor at a time (see :mod:`phi4flash.quant`). A checkpoint written by ``phi4flash quantize``
            loads quantized without it.

    Returns:
        The model in eval mode, without gradients.

    Raises:
        CheckpointError: unknown id, missing files, missing / unexpected / mis-shaped tensors (all listed),
            or a ``quantization`` entry that does not match its tensors or the request.
        ConfigError: a config.json of another model type or with values phi4flash cannot run.
        KernelUnavailableError: quantized weights on a device or dtype no kernel runs.
    """
    path = resolve_checkpoint(source, revision=revision, token=token)
    config = Phi4FlashConfig.from_json(path)
    stored = _stored_quantization(path, config)
    try:
        requested = QuantSpec.parse(quantize)
    except QuantizationError as err:
        raise ValueError(str(err)) from None
    if stored is not None and requested is not None and stored != requested:
        raise CheckpointError(f"{path} holds {stored.label} weights; load it without quantize= (or with "
                              f"quantize={stored.name!r}), or quantize the original checkpoint instead")
    spec = stored or requested
    target = parse_dtype(dtype) if dtype is not None else torch.bfloat16 if spec else parse_dtype(config.torch_dtype)
    device = torch.device(device or "cpu")
    if spec is not None:
        check_quantized_device(device, target, spec)
        config.quantization = spec.to_config()
    with torch.device("meta"):
        model = Phi4FlashForCausalLM(config)
    targets = quantize_modules_(model, spec) if spec is not None else {}
    expected: dict[str, tuple[tuple[int, ...], torch.dtype | None]] = {
        name: (shape, None) for name, shape in expected_shapes(model).items()}
    if stored is not None:
        expected.update(expected_quantized_tensors(targets))
    else:
        expected.update({f"{prefix}.weight": ((m.out_features, m.in_features), None) for prefix, m in targets.items()})
    files = _weight_files(path)
    _check_tensors(path, config, files, expected)
    pending: dict[str, dict[str, torch.Tensor]] = {}
    for name, file in files.items():
        if name not in expected:
            continue
        prefix, _, leaf = name.rpartition(".")
        if prefix in targets and leaf != "bias":
            # One tensor at a time, its file closed after it, so that the mapped float weights are let go.
            with _open_weights(file) as handle:  # type: ignore[attr-defined]
                tensor = handle.get_tensor(name)
                if stored is None:
                    targets[prefix].set_weight(tensor, device=device, dtype=target)
                    del tensor
                    release_freed_memory()
                else:
                    parts = pending.setdefault(prefix, {})
                    parts[leaf] = tensor
                    if len(parts) == len(quantized_shapes(1, 1, targets[prefix].bits, 1)):
                        targets[prefix].set_quantized(pending.pop(prefix), device=device, dtype=target)
            continue
        keep = acc_dtype(target) if leaf in FP32_PARAMETERS else target
        with _open_weights(file) as handle:  # type: ignore[attr-defined]
            tensor = handle.get_tensor(name).to(device=device, dtype=keep)
        model.get_submodule(prefix)._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)
    if config.tie_word_embeddings and spec is None:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.eval()
    _log_kernel_path(device, spec, target)
    model.checkpoint_path = path  # type: ignore[assignment]
    return model


@functools.cache
def _malloc_trim() -> ctypes._CFuncPtr | None:
    """glibc's ``malloc_trim``, or None where the C library is another."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def release_freed_memory() -> None:
    """Hand the memory freed so far back to the operating system. Quantizing while loading frees a float copy
    of every weight; glibc keeps such pages in its heap, so the process would stay as large as the float model
    (measured, real model in int8: 7.1 GB resident after loading without this, 4.1 GB with it)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _stored_quantization(path: Path, config: Phi4FlashConfig) -> QuantSpec | None:
    if config.quantization is None:
        return None
    try:
        return QuantSpec.from_config(config.quantization)
    except QuantizationError as err:
        raise CheckpointError(f"checkpoint {path}: {err}") from None


def _check_tensors(path: Path, config: Phi4FlashConfig, files: dict[str, Path],
                   expected: dict[str, tuple[tuple[int, ...], torch.dtype | None]]) -> None:
    """Every expected tensor present with its shape (and, for quantized tensors, dtype); nothing else."""
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    missing = sorted(set(expected) - set(files) - tied)
    unexpected = sorted(set(files) - set(expected) - tied)
    wrong = []
    for file in sorted(set(files.values())):
        with _open_weights(file) as handle:  # type: ignore[attr-defined]
            for name in handle.keys():  # noqa: SIM118 - safe_open has no __iter__
                if name not in expected:
                    continue
                shape, dtype = expected[name]
                found = handle.get_slice(name)
                got_shape, got_dtype = tuple(found.get_shape()), _SAFETENSORS_DTYPES.get(found.get_dtype())
                if got_shape != shape:
                    wrong.append(f"wrong shape: {name}: checkpoint {list(got_shape)}, model {list(shape)}")
                elif dtype is not None and got_dtype != dtype:
                    wrong.append(f"wrong dtype: {name}: checkpoint {found.get_dtype()}, expected {dtype}")
    if missing or unexpected or wrong:
        lines = [f"checkpoint {path} does not match the Phi4Flash architecture of its config.json"
                 + (" and its quantization entry:" if config.quantization is not None else ":")]
        lines += [f"  missing tensor: {n}" for n in missing]
        lines += [f"  unexpected tensor: {n}" for n in unexpected]
        lines += [f"  {n}" for n in wrong]
        lines.append("fix: use the checkpoint's own config.json, or re-export the weights under the official names"
                     + (" (`phi4flash quantize` writes quantized ones)" if config.quantization is not None else ""))
        raise CheckpointError("\n".join(lines))
    if not config.tie_word_embeddings and "lm_head.weight" not in files and not any(
            n.startswith("lm_head.") for n in files):
        raise CheckpointError(f"checkpoint {path}: tie_word_embeddings is false but lm_head.weight is missing")


def _log_kernel_path(device: torch.device, spec: QuantSpec | None, dtype: torch.dtype) -> None:
    if device.type == "cpu":
        from . import native

        weights = f"{spec.label if spec is not None else str(dtype).replace('torch.', '')} weights"
        if native.ready():  # builds them on first use (one log line of its own), as the first forward would
            logger.info("phi4flash on cpu: %s; phi4flash's C++ kernels for the selective scan, decode attention and "
                        "bfloat16 / int8 / int4 matrix-vector products", weights)
        else:
            logger.info("phi4flash on cpu: %s; pure PyTorch path%s", weights,
                        " (PyTorch's quantized kernels)" if spec is not None else "")
        return
    if spec is not None:
        logger.info("phi4flash on %s: %s weights through PyTorch's quantized kernels", device.type, spec.label)
    if device.type == "cuda":
        from .ops import cuda_kernels

        kernels = cuda_kernels()
        logger.info("phi4flash on CUDA: %s", "optional kernels " + ", ".join(sorted(kernels)) if kernels
                    else "pure PyTorch path (install phi4flash[cuda] for mamba-ssm / causal-conv1d kernels)")
    else:
        logger.info("phi4flash on %s: pure PyTorch path", device.type)


def save_checkpoint(model: Phi4FlashForCausalLM, out_dir: str | os.PathLike[str], *,
                    dtype: str | torch.dtype | None = None, max_shard_bytes: int | None = None) -> Path:
    """Write config.json and safetensors (sharded with an index when ``max_shard_bytes`` is set).

    Names are the official ones; a tied lm_head is not written. With ``dtype``, tensors are cast to it,
    except A_log and the lambdas, which stay float32 as in the real checkpoint. A quantized model is
    written in the portable quantized format, with the ``quantization`` entry in config.json.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    target = parse_dtype(dtype) if dtype is not None else model.dtype
    config = model.config.to_dict()
    config["torch_dtype"] = str(target).replace("torch.", "")
    with open(out / "config.json", "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    tensors = {}
    for name, shape in expected_shapes(model).items():
        del shape
        if name == "lm_head.weight" and model.config.tie_word_embeddings:
            continue
        param = model.get_parameter(name).detach()
        keep = acc_dtype(target) if name.rsplit(".", 1)[-1] in FP32_PARAMETERS else target
        tensor = param.to(device="cpu", dtype=keep).contiguous()
        # a view into a larger storage (e.g. of a mapped file) is copied; a tensor that owns its storage is
        # written as it is, so that saving a large model needs no second copy of it in memory
        tensors[name] = tensor if tensor.untyped_storage().nbytes() == tensor.nbytes else tensor.clone()
    for prefix, module in checkpoint_modules(model).items():
        tensors.update({f"{prefix}.{suffix}": t.contiguous() for suffix, t in module.portable().items()})
    if max_shard_bytes is None:
        save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
        return out
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, out / file, metadata={"format": "pt"})
        weight_map.update({name: file for name in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    with open(out / "model.safetensors.index.json", "w", encoding="utf-8") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return out


def quantize_checkpoint(source: str | os.PathLike[str], out_dir: str | os.PathLike[str],
                        quantize: str | QuantSpec, *, max_shard_bytes: int = 2 * 2**30,
                        revision: str | None = None, token: str | bool | None = None) -> Path:
    """Write a quantized copy of a checkpoint that ``phi4flash.load(out_dir)`` loads directly.

    The source is quantized while loading, on the CPU (peak memory: the quantized model plus one float
    tensor), then written with config.json's ``quantization`` entry, the tokenizer files and
    generation_config.json beside it.

    Args:
        source: a checkpoint folder, a hub id, or "embedded".
        out_dir: the folder to write (created; an existing checkpoint there is overwritten).
        quantize: "int8", "int4" or "int4-g<group size>" (or a QuantSpec).
        max_shard_bytes: largest safetensors file; bigger models are sharded with an index.
    """
    path = resolve_checkpoint(source, revision=revision, token=token)
    out = Path(out_dir)
    if out.resolve() == path.resolve():
        raise ValueError(f"the output folder {out} is the source checkpoint; write the quantized copy elsewhere")
    model = load_model(path, device="cpu", quantize=quantize)
    sharded = model_weight_bytes(model) > max_shard_bytes
    save_checkpoint(model, out, max_shard_bytes=max_shard_bytes if sharded else None)
    weights = {"config.json", "model.safetensors", "model.safetensors.index.json"}
    for pattern in CHECKPOINT_PATTERNS:
        for file in path.glob(pattern):
            if file.name not in weights and not file.name.endswith(".safetensors"):
                shutil.copyfile(file, out / file.name)
    return out
