"""A test-only model family: a few-line DiT, registered from the test, with no line in the package naming it.

It proves that a family plugs in through :mod:`lightx2v.engine.family` alone: the pipeline, the config layer, the CLI
and the hooks run it without knowing it. "Text encoding" is a fixed hash of the prompt's characters (no weights),
the DiT is a stack of residual MLP blocks on the noise latents, the "VAE" maps 3 latent channels to pixels.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import save_file

from lightx2v.engine.family import ModelFamily, register_family, unregister_family
from lightx2v.engine.guidance import SequentialCFG
from lightx2v.engine.messages import Frames, message
from lightx2v.engine.request import SamplingConfig
from lightx2v.loading import assign_strict, iter_safetensors, read_json
from lightx2v.models.block_stack import BlockStack
from lightx2v.models.plan import HookPlan
from lightx2v.schedulers import make_scheduler

WIDTH = 8


class ToyArgs(tuple):
    """Block inputs: (modulation, temb) as the caching hooks expect them."""

    @property
    def modulation(self):
        return self[0]

    @property
    def temb(self):
        return self[1]


class ToyDiT(nn.Module):
    hook_plan = HookPlan(blocks="blocks", embeddings=("embed",), quantize_prefixes=("blocks.",))

    def __init__(self, layers: int = 3):
        super().__init__()
        self.embed = nn.Linear(3 + WIDTH, WIDTH)
        self.blocks = nn.ModuleList([nn.Linear(WIDTH, WIDTH) for _ in range(layers)])
        self.out = nn.Linear(WIDTH, 3)
        self.block_stack = BlockStack(self.blocks, lambda block, x, a: x + torch.tanh(block(x) + a.modulation))

    def forward(self, x, t, text):
        """x: [B, 3, F, H, W]; t: [B]; text: [B, WIDTH] -> velocity like x."""
        b, c, f, h, w = x.shape
        tokens = x.flatten(2).transpose(1, 2)  # [B, L, 3]
        temb = torch.sin(t.float()[:, None] / 1000 * torch.arange(1, WIDTH + 1))  # [B, WIDTH]
        cond = (text + temb)[:, None].expand(b, tokens.shape[1], WIDTH)
        h_ = self.embed(torch.cat([tokens, cond], dim=-1))
        h_ = self.block_stack(h_, ToyArgs((temb[:, None], temb)))
        return self.out(h_).transpose(1, 2).reshape(b, c, f, h, w)


def write_toy_model(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    model = ToyDiT()
    sd = {k: torch.randn(v.shape, generator=g) * 0.3 for k, v in model.state_dict().items()}
    save_file(sd, str(folder / "toy.safetensors"))
    (folder / "toy.json").write_text(json.dumps({"layers": 3}))
    return folder


def text_embedding(prompt: str) -> torch.Tensor:
    codes = torch.tensor([ord(c) % 97 for c in prompt] or [0], dtype=torch.float32)
    return torch.stack([torch.cos(codes * (i + 1) / 7).mean() for i in range(WIDTH)])[None]  # [1, WIDTH]


@message("toy.cond")
@dataclass(frozen=True)
class ToyCond:
    request: dict
    text: torch.Tensor
    text_null: torch.Tensor | None
    shape: tuple
    fps: int


@message("toy.latents")
@dataclass(frozen=True)
class ToyLatents:
    request: dict
    latents: torch.Tensor
    fps: int


class ToyEncoder:
    name = "encoder"
    device = torch.device("cpu")

    def check_request(self, request):
        if request.images:
            raise ValueError("the toy family takes no images")

    def check_sampling(self, s):
        pass

    def __call__(self, request, ctx):
        s = request.sampling
        with ctx.stage("text encode"):
            null = text_embedding(request.negative_prompt) if s.do_cfg else None
            cond = ToyCond(request.to_wire(), text_embedding(request.prompt), null,
                           (1, 3, (s.num_frames - 1) // 4 + 1, s.height // 8, s.width // 8), s.fps)
        return cond


class ToyTransformer:
    name = "transformer"
    device = torch.device("cpu")

    def __init__(self, model_path: Path):
        layers = read_json(model_path / "toy.json", "toy config")["layers"]
        with torch.device("meta"):
            dit = ToyDiT(layers)
        assign_strict(dit, iter_safetensors([model_path / "toy.safetensors"]), what="toy checkpoint")
        self.dit = dit.eval()
        self.guidance = SequentialCFG()
        self.forwards = 0

    def check_request(self, request):
        pass

    def check_sampling(self, s):
        pass

    def __call__(self, cond: ToyCond, ctx):
        s = SamplingConfig.from_dict(cond.request["sampling"])
        g = torch.Generator().manual_seed(cond.request["seed"])
        x = torch.randn(cond.shape, generator=g)
        sched = make_scheduler("euler", shift=s.sample_shift)
        sched.set_timesteps(s.infer_steps)

        def predict(x, t, texts, branches):
            self.forwards += 1
            return self.dit(x, t, texts[0])

        with ctx.stage("denoise"):
            for i, t in enumerate(sched.timesteps):
                v = self.guidance(predict, x, t.reshape(1), cond.text, cond.text_null, s.guidance_scale)
                x = sched.step(v, x)
                ctx.step("denoise", i + 1, s.infer_steps)
        return ToyLatents(cond.request, x, cond.fps)


class ToyDecoder:
    name = "decoder"
    device = torch.device("cpu")

    def check_request(self, request):
        pass

    def check_sampling(self, s):
        pass

    def __call__(self, lat: ToyLatents, ctx):
        with ctx.stage("VAE decode"):
            x = torch.nn.functional.interpolate(lat.latents[0].transpose(0, 1), scale_factor=8)  # [F', 3, H, W]
            frames = (torch.tanh(x) / 2 + 0.5).permute(0, 2, 3, 1).contiguous()
        return Frames(frames, lat.fps, lat.request)


def toy_family(tiny_root: Path) -> ModelFamily:
    def tiny_model(task, model_cls):
        folder = tiny_root / "toy-tiny"
        return folder if (folder / "toy.safetensors").is_file() else write_toy_model(folder)

    return ModelFamily(
        name="toy",
        model_classes={"toy_dit": {"t2v": {"infer_steps": 3, "height": 32, "width": 32, "num_frames": 5,
                                           "guidance_scale": 3.0}}},
        build_encoder=lambda spec: ToyEncoder(),
        build_transformer=lambda spec: ToyTransformer(Path(spec.model_path)),
        build_decoder=lambda spec: ToyDecoder(),
        tiny_model=tiny_model,
    )


class registered_toy:
    """``with registered_toy(tmp) as fam:`` the toy family is registered inside the block only."""

    def __init__(self, root: Path):
        self.family = toy_family(root)

    def __enter__(self):
        return register_family(self.family)

    def __exit__(self, *exc):
        unregister_family(self.family.name)


