"""LightX2V's own Wan configs and examples (tests/data, written by tools/lightx2v_corpus.py from ModelTC/LightX2V at
f8aee98) pointed at our tiny models: which model class and task each is run with, and the tiny files that stand in
for the paths it names. Only paths and sizes change; every other key and value is LightX2V's.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lightx2v.compat import NOT_IMPLEMENTED_PATTERN

DATA = Path(__file__).resolve().parent / "data"
CONFIGS = {k: v for k, v in json.loads((DATA / "lightx2v_wan_configs.json").read_text()).items()
           if not k.startswith("_")}
CLASSES = json.loads((DATA / "lightx2v_wan_config_classes.json").read_text())
EXAMPLES = {k: v for k, v in json.loads((DATA / "lightx2v_wan_examples.json").read_text()).items()
            if not k.startswith("_")}
OURS = ("wan2.1", "wan2.1_distill", "wan2.2_moe", "wan2.2_moe_distill", "wan2.2")
NOT_IMPLEMENTED = re.compile(NOT_IMPLEMENTED_PATTERN)

# The sizes a config is shrunk to (everything else stays): CPU seconds per generation.
SIZE = {"target_height": 32, "target_width": 32, "target_video_length": 5}
PATH_KEYS = ("dit_original_ckpt", "dit_quantized_ckpt", "high_noise_original_ckpt", "low_noise_original_ckpt",
             "high_noise_quantized_ckpt", "low_noise_quantized_ckpt", "tae_path", "vae_path")
ARCH_KEYS = ("dim", "ffn_dim", "freq_dim", "in_dim", "out_dim", "num_heads", "num_layers", "eps", "text_dim")
_WAN_NAMED = {"vace": "wan2.1_vace", "animate": "wan2.2_animate", "s2v": "wan2.2_s2v", "dancer": "wan_dancer",
              "matrix_game2": "wan2.1_sf_mtxg2", "matrix_game3": "wan2.2_matrix_game3", "causvid": "wan2.1_causvid",
              "self_forcing": "wan2.1_sf", "meanflow": "wan2.1_mean_flow_distill"}


def model_class(name: str, cfg: dict) -> str:
    """The model class LightX2V runs ``name`` with: the repository's own invocations (lightx2v_wan_config_classes),
    else what the config is (its file name and keys: a step list is a distilled model, wan22 / moe two experts,
    ti2v the 5B model)."""
    known = CLASSES[name]["model_cls"]
    ours = [c for c in known if c in OURS]
    if ours:
        return ours[-1] if "wan22" in name and "wan2.2_moe" in ours else ours[0]
    if known:
        return known[0]
    low = name.lower()
    for part, cls in _WAN_NAMED.items():
        if part in low:
            return cls
    two = ("moe" in low or "wan22" in low or "boundary" in cfg or "boundary_step_index" in cfg) and "ti2v" not in low
    if "ti2v" in low or cfg.get("num_channels_latents") == 48:
        return "wan2.2"
    distill = "denoising_step_list" in cfg and ("distill" in low or "boundary_step_index" in cfg or not two)
    if two:
        return "wan2.2_moe_distill" if distill and "boundary" not in cfg else "wan2.2_moe"
    return "wan2.1_distill" if distill else "wan2.1"


def task_of(name: str, model_cls: str) -> str:
    """The task LightX2V runs ``name`` with: the one its file name says (the words t2v / i2v / flf2v; ti2v: t2v unless
    i2v follows), else its invocations' first, else t2v."""
    words = re.split(r"[_./-]", Path(name).stem.lower())
    named = [w for w in words if w in ("t2v", "i2v", "flf2v")]
    if named:
        return named[0]
    tasks = [t for t in CLASSES[name]["tasks"] if t in ("t2v", "i2v", "flf2v", "animate", "vace", "s2v")]
    return tasks[0] if tasks else "t2v"


def outcome(error: Exception | None) -> str:
    """"ran" / "refused" (the not-implemented message) / "other"."""
    if error is None:
        return "ran"
    return "refused" if NOT_IMPLEMENTED.search(str(error)) else "other"


# --- tiny stand-ins for the files a config names -------------------------------------------------------------------

class TinyFiles:
    """Files for the paths of a config, made on first use under ``root``: DiT weights (float, and pre-quantized in
    LightX2V's layout), a LoRA, a TAE, a LightVAE, a RIFE model, all sized for the built-in tiny models."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self._made: dict = {}

    def _once(self, key, make):
        if key not in self._made:
            self._made[key] = make()
        return self._made[key]

    def model(self, model_cls: str, task: str) -> Path:
        from lightx2v.models.wan.tiny import ensure_tiny_model

        return self._once(("model", model_cls, task), lambda: ensure_tiny_model(task, model_cls))

    def dit_file(self, model_cls: str, task: str, expert: str | None = None) -> Path:
        """The tiny model's own DiT weights (one file): what a distilled DiT file stands in for."""
        from lightx2v.models.wan.checkpoint import EXPERT_FOLDERS

        folder = self.model(model_cls, task)
        if expert is not None:
            folder = folder / EXPERT_FOLDERS["wan"][expert]
        return folder / "diffusion_pytorch_model.safetensors"

    def quantized(self, model_cls: str, task: str, scheme: str, expert: str | None = None,
                  by_block: bool = False) -> Path:
        """The tiny DiT pre-quantized as LightX2V's converter writes it (tools/convert/converter.py
        --quantized): each 2-D weight under blocks.N.{self_attn, cross_attn, ffn} as int8 (round(w / s)) or
        float8_e4m3fn (w / s) with ``X.weight_scale`` = row absmax / qmax ([out, 1] float32); the rest as it is.
        ``by_block``: its --save_by_block layout (a folder of block_N.safetensors + non_block.safetensors)."""
        def make():
            sd = load_file(str(self.dit_file(model_cls, task, expert)))
            out = {}
            for key, t in sd.items():
                parts = key.split(".")
                if t.ndim == 2 and parts[0] == "blocks" and parts[2] in ("self_attn", "cross_attn", "ffn"):
                    wf = t.float()
                    qmax = 127.0 if scheme == "int8" else torch.finfo(torch.float8_e4m3fn).max
                    scale = wf.abs().amax(dim=1, keepdim=True).clamp(min=1e-5) / qmax
                    q = (wf / scale).round().clamp(-128, 127).to(torch.int8) if scheme == "int8" else \
                        (wf / scale).clamp(-qmax, qmax).to(torch.float8_e4m3fn)
                    out[key], out[key + "_scale"] = q.contiguous(), scale.float().contiguous()
                else:
                    out[key] = t
            name = f"{model_cls}-{task}-{expert or 'dit'}-{scheme}"
            if not by_block:
                path = self.root / f"{name}.safetensors"
                path.parent.mkdir(parents=True, exist_ok=True)
                save_file(out, str(path))
                return path
            folder = self.root / name
            folder.mkdir(parents=True, exist_ok=True)
            blocks: dict[str, dict] = {}
            for key, t in out.items():
                m = re.match(r"blocks\.(\d+)\.", key)
                blocks.setdefault(f"block_{m.group(1)}" if m else "non_block", {})[key] = t
            for stem, tensors in blocks.items():
                save_file(tensors, str(folder / f"{stem}.safetensors"))
            return folder
        return self._once(("q", model_cls, task, scheme, expert, by_block), make)

    def lora(self, model_cls: str, task: str) -> Path:
        """A rank-2 LoRA on every block's self-attention q and o (original Wan names, lora_down / lora_up)."""
        def make():
            from lightx2v.models.wan.checkpoint import read_dit_config

            expert = "high" if model_cls.startswith("wan2.2_moe") else None
            cfg = read_dit_config(self.model(model_cls, task), "wan", expert)
            g = torch.Generator().manual_seed(5)
            sd = {}
            for i in range(cfg.num_layers):
                for proj in ("q", "o"):
                    base = f"diffusion_model.blocks.{i}.self_attn.{proj}"
                    sd[f"{base}.lora_down.weight"] = torch.randn(2, cfg.dim, generator=g) * 0.01
                    sd[f"{base}.lora_up.weight"] = torch.randn(cfg.dim, 2, generator=g) * 0.01
            path = self.root / f"lora-{model_cls}-{task}.safetensors"
            path.parent.mkdir(parents=True, exist_ok=True)
            save_file(sd, str(path))
            return path
        return self._once(("lora", model_cls, task), make)

    def tae(self, z_dim: int) -> Path:
        def make():
            from lightx2v.models.wan.tae import TAEConfig, TinyAutoencoder, save_tae

            torch.manual_seed(0)
            cfg = TAEConfig() if z_dim == 16 else TAEConfig(latent_channels=48, patch_size=2)
            return save_tae(TinyAutoencoder(cfg), self.root / f"taew-{z_dim}.pth")
        return self._once(("tae", z_dim), make)

    def lightvae(self) -> Path:
        def make():
            from lightx2v.models.wan.vae import WanVAE, WanVAEConfig, save_wan_vae

            torch.manual_seed(0)
            path = self.root / "lightvaew2_1.pth"
            save_wan_vae(WanVAE(WanVAEConfig(base_dim=4, dim_mult=(1, 2, 2, 2), num_res_blocks=1)), path)
            return path
        return self._once("lightvae", make)

    def rife(self) -> Path:
        def make():
            from lightx2v.models.rife import IFNet, save_rife

            torch.manual_seed(0)
            return save_rife(IFNet().eval(), self.root / "flownet.pkl")
        return self._once("rife", make)


def substitute(cfg: dict, model_cls: str, task: str, files: TinyFiles) -> dict:
    """``cfg`` with its paths pointed at tiny files and its sizes shrunk (SIZE; the DiT sizes a config repeats
    become the tiny DiT's); every other key and value unchanged."""
    from lightx2v.models.wan.checkpoint import read_dit_config

    out = dict(cfg)
    for key, value in SIZE.items():
        if key in out:
            out[key] = value
    tiny = files.model(model_cls, task) if model_cls in OURS else None
    if tiny is not None and any(k in out for k in ARCH_KEYS):
        expert = "high" if model_cls.startswith("wan2.2_moe") else None
        dit = read_dit_config(tiny, "wan", expert)
        for key in ARCH_KEYS:
            if key in out:
                out[key] = getattr(dit, key)
    if tiny is None:
        return out
    scheme = str(out.get("dit_quant_scheme", "fp8")).split("-")[0]
    for key in PATH_KEYS:
        if not out.get(key):
            continue
        expert = "high" if key.startswith("high") else "low" if key.startswith("low") else None
        if key in ("tae_path",):
            out[key] = str(files.tae(48 if model_cls == "wan2.2" else 16))
        elif key == "vae_path":
            out[key] = str(files.lightvae())
        elif "quantized" in key and scheme in ("fp8", "int8"):
            out[key] = str(files.quantized(model_cls, task, scheme, expert, by_block=expert is None))
        elif "quantized" not in key:
            out[key] = str(files.dit_file(model_cls, task, expert))
    if isinstance(out.get("lora_configs"), list):
        out["lora_configs"] = [{**e, "path": str(files.lora(model_cls, task))} if isinstance(e, dict) else e
                               for e in out["lora_configs"]]
    vfi = out.get("video_frame_interpolation")
    if isinstance(vfi, dict) and "model_path" in vfi:
        out["video_frame_interpolation"] = {**vfi, "model_path": str(files.rife())}
    return out
