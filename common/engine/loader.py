"""Model weights: resolve a model name to a directory, pick the dtype, load the safetensors weights
and the tokenizer (the model's, or ``--tokenizer``'s).

The architecture itself (``config.json``) is read by ``common.engine.model_config``.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from common.config import require
from common.engine.config import EngineConfig
from common.engine.demo_model import ensure_demo_checkpoint
from common.engine.model import CausalLM
from common.engine.model_config import ModelConfig, ModelLoadError, read_json
from common.engine.parallel import SINGLE, Shard, TensorParallel
from common.engine.tokenizer import Tokenizer, read_chat_template

logger = logging.getLogger(__name__)

HUB_ALLOW_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.jinja"]
TOKENIZER_PATTERNS = ["*.json", "*.jinja"]  # a tokenizer without the weights
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name: str, config: ModelConfig | None = None, device: torch.device | str = "cpu") -> torch.dtype:
    """``float32``/``bfloat16``/``float16``, or ``auto``: the checkpoint's dtype on CUDA, float32 on CPU."""
    require(name in ("auto", *_DTYPES), "dtype", f"{name!r} is not one of auto, float32, bfloat16, float16")
    if name != "auto":
        return _DTYPES[name]
    if torch.device(device).type == "cpu" or config is None:
        return torch.float32
    return _DTYPES.get(config.torch_dtype or "", torch.bfloat16)


def resolve_model_path(
    model: str, hub_timeout_s: float = 10.0, flag: str = "model", allow_patterns: list[str] = HUB_ALLOW_PATTERNS
) -> Path:
    """``"demo"`` -> the built-in checkpoint; a directory -> itself; else the Hugging Face Hub's files
    matching ``allow_patterns``.  Errors name ``flag`` (the option that gave ``model``).

    A hub id already in the local hub cache is used without network.  Otherwise the hub must
    answer within ``hub_timeout_s`` (so without network this fails fast with ``ModelLoadError``);
    the download itself then takes as long as it takes.
    """
    if model == "demo":
        return ensure_demo_checkpoint()
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.exists() or model.startswith(("/", "./", "../", "~")):
        raise ModelLoadError(f"{flag} {model!r}: not a directory")
    return _download(model, hub_timeout_s, flag, allow_patterns)


def _download(repo_id: str, timeout_s: float, flag: str, allow_patterns: list[str]) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    hint = f"pass a local {flag} directory or 'demo'"
    name = f"{flag} {repo_id!r}"
    try:
        return Path(snapshot_download(repo_id, allow_patterns=allow_patterns, local_files_only=True))
    except LocalEntryNotFoundError:
        pass  # not cached: ask the hub
    except Exception as e:  # e.g. an invalid repo id
        raise ModelLoadError(f"{name} is neither a local directory nor a hub id ({e}); {hint}") from e
    _probe_hub(repo_id, timeout_s, name, hint)
    try:
        return Path(snapshot_download(repo_id, allow_patterns=allow_patterns, etag_timeout=timeout_s))
    except Exception as e:  # every hub failure becomes one ModelLoadError
        raise ModelLoadError(f"{name}: Hugging Face Hub download failed ({_first_line(e)}); {hint}") from e


def _probe_hub(repo_id: str, timeout_s: float, name: str, hint: str) -> None:
    """``repo_info`` on a daemon thread, abandoned after ``timeout_s`` (DNS lookups ignore HTTP timeouts)."""
    from huggingface_hub import HfApi

    errors: list[Exception] = []

    def probe() -> None:
        try:
            HfApi().repo_info(repo_id, timeout=timeout_s)
        except Exception as e:  # reported below
            errors.append(e)

    thread = threading.Thread(target=probe, name="hub-probe", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise ModelLoadError(f"{name}: no answer from the Hugging Face Hub within {timeout_s:g}s; {hint}")
    if errors:
        raise ModelLoadError(
            f"{name} is not a local directory and the Hugging Face Hub cannot provide it "
            f"({_first_line(errors[0])}); {hint}"
        ) from errors[0]


def load_tokenizer(config: EngineConfig, model_path: Path, vocab_size: int) -> Tokenizer:
    """The engine's tokenizer: ``--tokenizer``'s (a directory or hub id; its vocabulary must fit the model's
    ``vocab_size``) if given, else the model directory's; with ``--chat-template``'s template if given.
    Raises ``ModelLoadError``."""
    chat_template = read_chat_template(config.chat_template) if config.chat_template is not None else None
    if config.tokenizer is None:
        return Tokenizer.from_dir(model_path, chat_template)
    path = resolve_model_path(config.tokenizer, flag="tokenizer", allow_patterns=TOKENIZER_PATTERNS)
    tokenizer = Tokenizer.from_dir(path, chat_template)
    if tokenizer.vocab_size > vocab_size:
        raise ModelLoadError(
            f"tokenizer {config.tokenizer!r}: {tokenizer.vocab_size} tokens, more than the model's {vocab_size}"
        )
    return tokenizer


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint: the shards of ``model.safetensors.index.json``, else ``*.safetensors``."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ModelLoadError(f"{index}: no weight_map")
        files = [path / name for name in sorted(set(weight_map.values()))]
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            raise ModelLoadError(f"{index}: shard files missing: {', '.join(absent)}")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{path}: no *.safetensors weight files")
    return files


def load_model(
    path: Path, config: ModelConfig, dtype: torch.dtype, device: torch.device | str, tp: TensorParallel = SINGLE,
    attention_backend: str = "torch", decode_gemv: bool = False,
) -> CausalLM:
    """Build the model and fill every parameter from the checkpoint, in ``dtype`` on ``device``, eval mode,
    prepared for inference (``CausalLM.prepare``: fused projections, rope table).  Under tensor
    parallelism only this rank's slice of a sharded tensor is read (``CausalLM.weight_shards``).

    Raises ``ModelLoadError`` naming missing/mis-shaped tensors or a corrupt file.
    """
    device = torch.device(device)
    with torch.device("meta"):
        model = CausalLM(config, tp, attention_backend, decode_gemv)
    shards = model.weight_shards()
    expected = {name: _checkpoint_shape(tuple(p.shape), shards.get(name)) for name, p in model.named_parameters()}
    loaded: dict[str, torch.Tensor] = {}
    wrong_shape: list[str] = []
    files = weight_files(Path(path))
    for i, file in enumerate(files, 1):
        started = time.monotonic()
        try:
            with safe_open(file, framework="pt", device=str(device)) as f:
                for name in f.keys():
                    if name not in expected:
                        continue
                    shape = tuple(f.get_slice(name).get_shape())
                    if shape != expected[name]:
                        wrong_shape.append(f"{name} {list(shape)} (expected {list(expected[name])})")
                        continue
                    shard = shards.get(name)
                    tensor = f.get_tensor(name) if shard is None else _read_shard(f, name, shard, len(shape))
                    loaded[name] = tensor.to(dtype)
        except (SafetensorError, OSError, ValueError) as e:
            raise ModelLoadError(f"{file}: corrupt or unreadable safetensors file ({e})") from e
        logger.info("loaded shard %d/%d %s (%.1f MiB) in %.2f s", i, len(files), file.name,
                    file.stat().st_size / 2**20, time.monotonic() - started)
    if wrong_shape:
        raise ModelLoadError(f"{path}: tensors with the wrong shape: {', '.join(wrong_shape)}")
    missing = sorted(set(expected) - set(loaded))
    if missing:
        raise ModelLoadError(f"{path}: tensors missing from the checkpoint: {', '.join(missing)}")
    model.load_state_dict(loaded, strict=True, assign=True)
    model.prepare()
    rank = f", tensor-parallel rank {tp.rank} of {tp.world_size}" if tp.world_size > 1 else ""
    logger.info("loaded %s from %s (%s on %s%s)", config.architecture, path, dtype, device, rank)
    return model.eval()


def _checkpoint_shape(param_shape: tuple[int, ...], shard: Shard | None) -> tuple[int, ...]:
    """The whole tensor's shape in the checkpoint of a parameter holding ``shard`` of it."""
    if shard is None:
        return param_shape
    return param_shape[: shard.dim] + (shard.full,) + param_shape[shard.dim + 1 :]


def _read_shard(file, name: str, shard: Shard, ndim: int) -> torch.Tensor:
    """Read only ``shard`` of tensor ``name`` (a sliced read: the whole tensor is never materialised)."""
    index = [slice(None)] * ndim
    index[shard.dim] = slice(shard.start, shard.start + shard.size)
    return file.get_slice(name)[tuple(index)]
