"""Z-Image checkpoints: the release's diffusers layout, and strict loaders that each open only their own files.

Layout (``Tongyi-MAI/Z-Image-Turbo``)::

    model_index.json
    scheduler/scheduler_config.json
    text_encoder/config.json + model.safetensors (or model-0000i-of-0000n.safetensors + model.safetensors.index.json)
    tokenizer/ (tokenizer.json, tokenizer_config.json, chat template ...)
    transformer/config.json + diffusion_pytorch_model*.safetensors (+ .index.json)
    vae/config.json + diffusion_pytorch_model.safetensors

Our modules use diffusers' parameter names, so no key is renamed (the text encoder also accepts a
``Qwen3ForCausalLM`` save, ``model.``-prefixed). Every loader builds its module on the meta device, checks the
checkpoint's names and shapes against it (reading only the safetensors headers) and reports every missing,
unexpected or mis-shaped tensor in one :class:`~lightx2v.errors.CheckpointError`, then streams the tensors in.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator

import safetensors
import torch

from lightx2v.errors import CheckpointError, UserError
from lightx2v.loading import assign_strict, key_problems, read_json, safetensors_files
from lightx2v.models.z_image.arch import ZImageDiTConfig, ZImageSchedulerConfig, ZImageVAEConfig

TRANSFORMER_DIR = "transformer"
VAE_DIR = "vae"
TEXT_ENCODER_DIR = "text_encoder"
TOKENIZER_DIR = "tokenizer"
SCHEDULER_DIR = "scheduler"
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model"
TEXT_ENCODER_WEIGHTS = "model"


def model_root(model_path) -> Path:
    """The checkpoint folder, or UserError naming what a Z-Image folder must hold."""
    root = Path(model_path)
    if not root.exists():
        raise UserError(f"model path {str(root)!r} does not exist")
    if not root.is_dir():
        raise UserError(f"model path {str(root)!r} is not a directory")
    if not ((root / "model_index.json").is_file() or (root / TRANSFORMER_DIR).is_dir()):
        raise UserError(f"model path {str(root)!r} is not a Z-Image checkpoint in the diffusers layout: expected "
                        f"model_index.json and the folders {TRANSFORMER_DIR}/, {VAE_DIR}/, {TEXT_ENCODER_DIR}/, "
                        f"{TOKENIZER_DIR}/, {SCHEDULER_DIR}/")
    return root


# --- configs (JSON only: any stage may read them) --------------------------------------------------------------

def read_dit_config(model_path) -> ZImageDiTConfig:
    path = model_root(model_path) / TRANSFORMER_DIR / "config.json"
    return ZImageDiTConfig.from_diffusers_config(read_json(path, "transformer config"), str(path))


def read_vae_config(model_path) -> ZImageVAEConfig:
    path = model_root(model_path) / VAE_DIR / "config.json"
    return ZImageVAEConfig.from_diffusers_config(read_json(path, "VAE config"), str(path))


def read_scheduler_config(model_path) -> ZImageSchedulerConfig:
    path = model_root(model_path) / SCHEDULER_DIR / "scheduler_config.json"
    return ZImageSchedulerConfig.from_diffusers_config(read_json(path, "scheduler config"), str(path))


# --- safetensors: headers, then the wanted tensors -------------------------------------------------------------

def tensor_shapes(files: Iterable[Path]) -> dict[str, tuple[tuple[int, ...], Path]]:
    """{key: (shape, file)} from the safetensors headers (no tensor is read); a key stored twice is an error."""
    out: dict[str, tuple[tuple[int, ...], Path]] = {}
    for f in files:
        try:
            with safetensors.safe_open(str(f), framework="pt", device="cpu") as sf:
                for key in sf.keys():
                    if key in out:
                        raise CheckpointError(f"{f}: key {key!r} is also stored in {out[key][1]}")
                    out[key] = (tuple(sf.get_slice(key).get_shape()), Path(f))
        except CheckpointError:
            raise
        except Exception as e:  # a truncated or foreign file
            raise CheckpointError(f"{f}: cannot read it as safetensors: {e}") from e
    return out


def stream_tensors(files: Iterable[Path], keys: dict[str, str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for the tensors of ``files``; with ``keys`` ({name: key in the file}) only those, renamed."""
    wanted = None if keys is None else {v: k for k, v in keys.items()}
    for f in files:
        with safetensors.safe_open(str(f), framework="pt", device="cpu") as sf:
            for key in sf.keys():
                if wanted is None:
                    yield key, sf.get_tensor(key)
                elif key in wanted:
                    yield wanted[key], sf.get_tensor(key)


def _check(expected: dict[str, tuple], shapes: dict[str, tuple], what: str, show_key=None) -> None:
    metas = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    problems = key_problems(expected, metas, show_key)
    if problems:
        raise CheckpointError(f"{what}: " + "; ".join(problems))


def _expected(module: torch.nn.Module) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


# --- loaders ---------------------------------------------------------------------------------------------------

def load_dit(model_path, device="cpu", dtype: torch.dtype = torch.float32, attn_mode: str = "torch_sdpa"):
    """The DiT of ``transformer/``, every tensor in ``dtype`` on ``device``."""
    from lightx2v.models.z_image.dit import ZImageDiT
    from lightx2v.ops.attention import get_attention_backend

    folder = model_root(model_path) / TRANSFORMER_DIR
    cfg = read_dit_config(model_path)
    attn = get_attention_backend(attn_mode, dtype=dtype, head_dim=cfg.head_dim, device=torch.device(device))
    files = safetensors_files(folder, DIFFUSERS_WEIGHTS)
    with torch.device("meta"):
        model = ZImageDiT(cfg, attn)
    _check(_expected(model), {k: s for k, (s, _) in tensor_shapes(files).items()}, str(folder))
    assign_strict(model, stream_tensors(files), what=str(folder), dtype_for=lambda _n: dtype, device=device)
    return model.eval().requires_grad_(False)


def load_vae(model_path, device="cpu", dtype: torch.dtype = torch.float32):
    """The VAE of ``vae/`` (its mid-block attention runs on PyTorch SDPA: one head of the full width)."""
    from lightx2v.models.z_image.vae import ZImageVAE
    from lightx2v.ops.attention import get_attention_backend

    folder = model_root(model_path) / VAE_DIR
    cfg = read_vae_config(model_path)
    attn = get_attention_backend("torch_sdpa", dtype=dtype, head_dim=cfg.block_out_channels[-1],
                                 device=torch.device(device))
    files = safetensors_files(folder, DIFFUSERS_WEIGHTS)
    with torch.device("meta"):
        model = ZImageVAE(cfg, attn)
    _check(_expected(model), {k: s for k, (s, _) in tensor_shapes(files).items()}, str(folder))
    assign_strict(model, stream_tensors(files), what=str(folder), dtype_for=lambda _n: dtype, device=device)
    return model.eval().requires_grad_(False)


def load_text_encoder(model_path, device="cpu", dtype: torch.dtype = torch.float32, max_sequence_length: int = 512):
    """The Qwen3 text encoder of ``text_encoder/`` (cut after its second-to-last layer) and ``tokenizer/``."""
    from transformers import Qwen3Model

    from lightx2v.models.z_image import text_encoder as te

    root = model_root(model_path)
    folder = root / TEXT_ENCODER_DIR
    cfg = te.read_qwen3_config(folder / "config.json")
    files = safetensors_files(folder, TEXT_ENCODER_WEIGHTS)
    shapes = tensor_shapes(files)
    names, prefix = te.checkpoint_key_map(shapes, str(folder))
    with torch.device("meta"):
        full = Qwen3Model(cfg)
    _check(_expected(full), {n: shapes[k][0] for n, k in names.items()}, str(folder), show_key=lambda n: prefix + n)
    del full
    dropped = te.dropped_keys(cfg, names)
    kept = {n: k for n, k in names.items() if n not in dropped}
    model = te.build_text_model(cfg, device, dtype, stream_tensors(files, kept))
    tokenizer = te.load_tokenizer(root / TOKENIZER_DIR, cfg.vocab_size)
    return te.ZImageTextEncoder(tokenizer, model, max_sequence_length)
