"""The engine's shape: requests that vary per call, stages that load alone, messages that travel as bytes, families
as plugins, hooks on one block-stack hook point, progress and cancel (tiny models, CPU)."""

from __future__ import annotations

import dataclasses
import shutil

import pytest
import torch
import torch.nn as nn

from lightx2v import LightX2VPipeline
from lightx2v.config import build_config
from lightx2v.engine import messages as M
from lightx2v.engine.components import ComponentSlot
from lightx2v.engine.family import StageSpec, family_of
from lightx2v.engine.progress import CancelToken, RunContext
from lightx2v.errors import Cancelled, CheckpointError, UserError
from lightx2v.models.wan import family as wan
from lightx2v.models.wan.dit import WanDiT
from lightx2v.models.wan.stages import Expert
from lightx2v.models.wan.tiny import ensure_tiny_model

SMALL = dict(height=32, width=48, num_frames=5, infer_steps=3)


def _gen(pipe, seed=1, prompt="a cat", **kw):
    return pipe.generate(seed=seed, prompt=prompt, return_result_tensor=True, progress=False, **kw)["video"]


def _image(color=(200, 30, 60), size=(60, 40)):
    from PIL import Image

    return Image.new("RGB", size, color)


# --- 1. one generator, many requests -------------------------------------------------------------------------------

PER_REQUEST = [  # (generate() arguments, the same settings as create_generator() arguments)
    (dict(seed=3), {}),
    (dict(seed=5, height=48, width=32, num_frames=9, infer_steps=2, guidance_scale=3.0, sample_shift=3.0),
     dict(height=48, width=32, num_frames=9, infer_steps=2, guidance_scale=3.0, sample_shift=3.0)),
    (dict(seed=7, infer_steps=4, sample_solver="euler", guidance_scale=1.0),
     dict(infer_steps=4, sample_solver="euler", guidance_scale=1.0)),
    (dict(seed=1, target_shape=[64, 32]), dict(height=64, width=32)),
]


def test_one_generator_serves_requests_like_fresh_generators():
    shared = LightX2VPipeline().create_generator(**SMALL)
    outs = []
    for call, settings in PER_REQUEST:
        got = _gen(shared, **call)
        fresh = LightX2VPipeline().create_generator(**{**SMALL, **settings})
        want = _gen(fresh, seed=call["seed"])
        assert torch.equal(got, want), call
        outs.append(got)
    # the requests really differ: sizes, and the same size with other settings
    assert {o.shape for o in outs} == {(5, 32, 48, 3), (9, 48, 32, 3), (5, 64, 32, 3)}
    assert (outs[0] - outs[2]).abs().max() > 5e-2
    # and the generator's own defaults are untouched by them
    assert torch.equal(_gen(shared, seed=3), outs[0])


def test_per_request_image_size_and_task_checks():
    pipe = LightX2VPipeline(task="i2v").create_generator(**SMALL)
    wide = _image(size=(80, 40))
    shared = [_gen(pipe, image_path=wide, resize_mode=m, seed=2) for m in ("crop", "adaptive")]
    for mode, got in zip(("crop", "adaptive"), shared):
        want = _gen(LightX2VPipeline(task="i2v").create_generator(**SMALL, resize_mode=mode), image_path=wide,
                    seed=2)
        assert torch.equal(got, want), mode
    assert shared[0].shape != shared[1].shape  # adaptive picked the image's aspect ratio
    with pytest.raises(UserError, match="not divisible by 16"):
        _gen(pipe, image_path=_image(), height=40)
    with pytest.raises(UserError, match="load-time settings"):
        _gen(pipe, image_path=_image(), dit_quant_scheme="fp8")
    with pytest.raises(UserError, match="task 't2v' is not available"):
        _gen(pipe, task="t2v")


# --- 2. stages that load alone -------------------------------------------------------------------------------------

def _copy(src, dst, keep=None, drop=()):
    shutil.copytree(src, dst)
    for p in sorted(dst.iterdir()):
        if (keep is not None and p.name not in keep) or p.name in drop:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    return dst


def _held_modules(stage) -> list[nn.Module]:
    out = []
    for v in vars(stage).values():
        if isinstance(v, ComponentSlot):
            out += v.modules()
        elif isinstance(v, list) and v and isinstance(v[0], Expert):
            out += [e.dit for e in v]
        elif isinstance(v, nn.Module):
            out.append(v)
    return out


def _kinds(modules) -> set[str]:
    return {type(m).__name__ for root in modules for m in root.modules()}


def test_stages_load_alone_and_hold_only_their_weights(tmp_path):
    src = ensure_tiny_model("i2v")
    t5, vae, clip, dit = "models_t5_umt5-xxl-enc-bf16.pth", "Wan2.1_VAE.pth", wan.WAN_CLIP_FILE, \
        "diffusion_pytorch_model.safetensors"
    dit_only = _copy(src, tmp_path / "dit-only", keep={"config.json", dit})
    encoder_only = _copy(src, tmp_path / "encoder-only", drop={dit})  # the DiT's config.json stays, no shard
    vae_only = _copy(src, tmp_path / "vae-only", keep={vae})
    cfg = build_config(wan.MODEL_CLASS_DEFAULTS["wan2.1"]["i2v"], {}, SMALL, family=wan.WAN)

    def spec(root):
        return StageSpec(root, "wan2.1", "i2v", cfg)

    encoder = wan.build_encoder(spec(encoder_only))
    transformer = wan.build_transformer(spec(dit_only))
    decoder = wan.build_decoder(spec(vae_only))

    enc_kinds, dit_kinds, dec_kinds = (_kinds(_held_modules(s)) for s in (encoder, transformer, decoder))
    assert "WanDiT" not in enc_kinds and "UMT5EncoderModel" in enc_kinds and "CLIPVisionModel" in enc_kinds
    assert "Encoder3d" in enc_kinds and "Decoder3d" not in enc_kinds  # the VAE's encoder half only
    assert dit_kinds >= {"WanDiT"} and not dit_kinds & {"UMT5EncoderModel", "CLIPVisionModel", "Encoder3d",
                                                       "Decoder3d"}
    assert "Decoder3d" in dec_kinds and not dec_kinds & {"Encoder3d", "WanDiT", "UMT5EncoderModel"}
    (dec_vae,) = _held_modules(decoder)
    assert set(dec_vae.state_dict()) == {k for k in torch.load(src / vae, weights_only=True, mmap=True)
                                         if k.startswith(("decoder.", "conv2."))}

    # chained by hand, the stages give exactly the one-process pipeline's video
    pipe = LightX2VPipeline(model_path=src, task="i2v").create_generator(**SMALL)
    request = pipe.make_request(seed=4, prompt="a red box", image_path=_image(), return_result_tensor=True)
    ctx = RunContext()
    frames = decoder(transformer(encoder(request, ctx), ctx), ctx)
    assert torch.equal(frames.frames, pipe.run(request)[1])

    # the checks can fail: the one-process build needs every file, and a stage its own
    with pytest.raises(CheckpointError, match=vae):
        wan.build_all(spec(dit_only))
    with pytest.raises(CheckpointError, match=t5):
        wan.build_all(spec(_copy(src, tmp_path / "no-t5", drop={t5})))
    with pytest.raises(CheckpointError, match="diffusion_pytorch_model"):
        wan.build_transformer(spec(encoder_only))
    with pytest.raises(CheckpointError, match="Wan2.1_VAE.pth"):
        wan.build_decoder(spec(dit_only))
    with pytest.raises(CheckpointError, match=clip):
        wan.build_encoder(spec(_copy(src, tmp_path / "no-clip", drop={clip})))


def test_stages_load_alone_in_the_diffusers_layout(tmp_path):
    from lightx2v.convert import convert_checkpoint

    src = convert_checkpoint(ensure_tiny_model(), tmp_path / "d", layout="diffusers")
    cfg = build_config({}, {}, SMALL, family=wan.WAN)
    dit_only = _copy(src, tmp_path / "dit-only", keep={"transformer"})
    vae_only = _copy(src, tmp_path / "vae-only", keep={"vae"})
    encoder_only = _copy(src, tmp_path / "enc-only", drop={"vae"})
    t = wan.build_transformer(StageSpec(dit_only, "wan2.1", "t2v", cfg))
    d = wan.build_decoder(StageSpec(vae_only, "wan2.1", "t2v", cfg))
    with pytest.raises(CheckpointError, match="vae"):  # T2V: the encoder reads the VAE's config (latent shape)
        wan.build_encoder(StageSpec(encoder_only, "wan2.1", "t2v", cfg))
    no_shards = _copy(src, tmp_path / "e2")
    for f in (no_shards / "transformer").glob("*.safetensors"):
        f.unlink()  # the DiT's config.json stays
    e = wan.build_encoder(StageSpec(no_shards, "wan2.1", "t2v", cfg))
    assert e.vae is None  # T2V: no VAE weights in the encoder at all
    pipe = LightX2VPipeline(model_path=src).create_generator(**SMALL)
    request = pipe.make_request(seed=2, prompt="x", return_result_tensor=True)
    ctx = RunContext()
    assert torch.equal(d(t(e(request, ctx), ctx), ctx).frames, pipe.run(request)[1])


# --- 3. messages that travel ---------------------------------------------------------------------------------------

@M.message("test.inner")
@dataclasses.dataclass(frozen=True)
class _Inner:
    a: torch.Tensor
    note: str = ""


@M.message("test.outer")
@dataclasses.dataclass(frozen=True)
class _Outer:
    request: dict
    x: torch.Tensor
    y: torch.Tensor | None
    items: tuple
    meta: dict


def _sample_message():
    g = torch.Generator().manual_seed(0)
    f32 = torch.randn(3, 5, generator=g)
    f32[0, 0], f32[0, 1], f32[0, 2] = float("nan"), -0.0, float("inf")
    bf16 = torch.randn(2, 7, generator=g).to(torch.bfloat16)
    fp16 = torch.randn(4, generator=g).to(torch.float16)[::2]  # non-contiguous
    return _Outer({"request_id": "r1", "seed": 3}, f32, None,
                  (_Inner(bf16, "b"), _Inner(fp16), _Inner(torch.arange(6, dtype=torch.int64).reshape(2, 3)),
                   _Inner(torch.tensor([True, False]))), {"shape": [1, 2], "fps": 16, "empty": torch.zeros(0, 3)})


def test_messages_roundtrip_bit_exact_and_zero_copy():
    msg = _sample_message()
    data = M.to_bytes(msg)
    back = M.from_bytes(data)
    assert M.equal(back, msg) and back.items[0].a.dtype == torch.bfloat16
    assert torch.equal(back.x.view(torch.int32), msg.x.view(torch.int32))  # NaN / -0.0 / inf bits too
    assert M.peek(data)["kind"] == "test.outer" and M.peek(data)["request_id"] == "r1"
    buf = bytearray(data)  # a writable buffer (shared memory would be one): tensors are views of it
    view = M.from_bytes(buf)
    base = torch.frombuffer(buf, dtype=torch.uint8).data_ptr()
    assert base <= view.x.data_ptr() < base + len(buf)
    other = dataclasses.replace(msg, x=msg.x + 1)
    assert not M.equal(M.from_bytes(M.to_bytes(other)), msg)


def test_bad_messages_are_named():
    data = M.to_bytes(_sample_message())
    for cut in (3, 20, len(data) - 1):
        with pytest.raises(M.MessageError, match="truncated"):
            M.from_bytes(data[:cut])
    for pos in (len(data) - 5, 20):  # a payload byte, a header byte
        flipped = bytearray(data)
        flipped[pos] ^= 0x10
        with pytest.raises(M.MessageError, match="checksum|not valid JSON|does not fit"):
            M.from_bytes(flipped)
    payload_flip = bytearray(data)
    payload_flip[-5] ^= 1
    with pytest.raises(M.MessageError, match="checksum mismatch"):
        M.from_bytes(payload_flip)
    wrong_version = bytearray(data)
    wrong_version[4:6] = (99).to_bytes(2, "little")
    with pytest.raises(M.MessageError, match="version 99"):
        M.from_bytes(wrong_version)
    with pytest.raises(M.MessageError, match="not a lightx2v message"):
        M.from_bytes(b"JUNK" + data[4:])

    @M.message("test.gone")
    @dataclasses.dataclass(frozen=True)
    class Gone:
        request: dict

    gone = M.to_bytes(Gone({"request_id": "g"}))
    M._KINDS.pop("test.gone")
    with pytest.raises(M.MessageError, match="unknown message kind 'test.gone'"):
        M.from_bytes(gone)
    with pytest.raises(TypeError, match="not a registered message"):
        M.to_bytes(Gone({}))


WAN_CASES = [("wan2.1", "t2v"), ("wan2.1", "i2v"), ("wan2.1", "flf2v"), ("wan2.1_distill", "t2v"),
             ("wan2.2_moe", "t2v"), ("wan2.2_moe", "i2v"), ("wan2.2_moe_distill", "i2v"), ("wan2.2", "t2v"),
             ("wan2.2", "i2v")]


@pytest.mark.parametrize("model_cls, task", WAN_CASES)
def test_every_wan_class_through_bytes_equals_in_process(model_cls, task):
    steps = {} if "distill" in model_cls else {"infer_steps": 2}  # distilled: their 4-step list
    pipe = LightX2VPipeline(model_cls=model_cls, task=task).create_generator(height=32, width=64, num_frames=5,
                                                                           **steps)
    images = {"t2v": {}, "i2v": {"image_path": _image()},
              "flf2v": {"image_path": _image(), "last_frame_path": _image((20, 200, 90))}}[task]
    request = pipe.make_request(seed=9, prompt="a red box", return_result_tensor=True, **images)
    ref = pipe.run(request)[1]
    r, ctx = pipe.runner, RunContext()
    cond = M.from_bytes(M.to_bytes(r.encoder(request, ctx)))
    lat = M.from_bytes(M.to_bytes(r.transformer(cond, ctx)))
    frames = M.from_bytes(M.to_bytes(r.decoder(lat, ctx)))
    assert torch.equal(frames.frames, ref)
    assert frames.fps == (24 if model_cls == "wan2.2" else 16) and frames.request["request_id"] == request.request_id


# --- 4. families as plugins ----------------------------------------------------------------------------------------

def test_a_toy_family_runs_through_pipeline_and_cli(tmp_path):
    from toy_family import registered_toy

    from lightx2v.cli import main
    from lightx2v.io.video import read_video

    with registered_toy(tmp_path):
        assert family_of("toy_dit").name == "toy"
        pipe = LightX2VPipeline(model_cls="toy_dit").create_generator()
        a = _gen(pipe, prompt="a cat")
        b = _gen(pipe, prompt="a dog")
        assert a.shape == (2, 32, 32, 3) and (a - b).abs().max() > 1e-2  # the prompt matters
        assert pipe.runner.transformer.forwards == 2 * 2 * 3  # CFG (guidance 3): two forwards x 3 steps, x2 calls
        # a generic hook works on a family it has never heard of (first-block caching at threshold 0: exact)
        from lightx2v.hooks.caching import FirstBlockCacheConfig, apply_feature_caching

        no_cfg = _gen(pipe, prompt="a cat", guidance_scale=1.0)  # one branch: the toy keeps no per-branch state
        hook = apply_feature_caching(pipe.runner.transformer.dit, FirstBlockCacheConfig(0.0))
        hook.begin_generation(3)
        assert torch.equal(_gen(pipe, prompt="a cat", guidance_scale=1.0), no_cfg)
        assert hook.stats()["cond"]["computed"] == 3
        hook.remove()
        out = tmp_path / "toy.mp4"
        assert main(["generate", "--model_cls", "toy_dit", "--prompt", "a cat", "--save_result_path", str(out),
                     "--no_progress"]) == 0
        assert read_video(out).shape == (2, 32, 32, 3)
        msg = M.to_bytes(pipe.runner.encoder(pipe.make_request(prompt="x", return_result_tensor=True),
                                             RunContext()))
        assert M.peek(msg)["kind"] == "toy.cond"
    with pytest.raises(UserError, match="unknown model_cls 'toy_dit'"):
        LightX2VPipeline(model_cls="toy_dit")


# --- 5. hooks that compose, guidance as a strategy -----------------------------------------------------------------

def test_lora_caching_and_offload_compose_on_one_dit(tmp_path):
    import copy

    from safetensors.torch import save_file

    from lightx2v.hooks.caching import TeaCacheConfig, apply_feature_caching
    from lightx2v.hooks.lora import LoRAConfig, LoRASpec, apply_lora
    from lightx2v.hooks.offload import OffloadConfig, apply_offload
    from lightx2v.models.wan.arch import PRESETS
    from lightx2v.ops.attention import get_attention_backend

    cfg = PRESETS["tiny"]
    attn = get_attention_backend("torch_sdpa", dtype=torch.float32, head_dim=cfg.head_dim, device=torch.device("cpu"))
    torch.manual_seed(0)
    base = WanDiT(cfg, attn).eval()
    g = torch.Generator().manual_seed(1)
    lora = {f"diffusion_model.blocks.{i}.self_attn.q.lora_{ab}.weight":
            torch.randn((4, cfg.dim) if ab == "A" else (cfg.dim, 4), generator=g) * 0.2
            for i in range(cfg.num_layers) for ab in "AB"}
    save_file(lora, str(tmp_path / "l.safetensors"))
    lcfg = LoRAConfig((LoRASpec(str(tmp_path / "l.safetensors"), 0.7),), mode="dynamic")
    x, t, ctx = torch.randn(1, 16, 2, 8, 8), torch.tensor([700.0]), torch.randn(1, 6, cfg.text_dim)
    plain = copy.deepcopy(base)
    apply_lora(plain, lcfg)
    both = copy.deepcopy(base)
    apply_lora(both, lcfg)
    cache = apply_feature_caching(both, TeaCacheConfig(0.0, (1.0, 0.0), True))
    offload = apply_offload(both, OffloadConfig(cpu_offload=True, offload_granularity="block"), torch.device("cpu"))
    cache.begin_generation(2)
    with torch.no_grad():
        want = [plain(x, t, ctx), plain(x, t * 0.5, ctx)]
        got = [both(x, t, ctx), both(x, t * 0.5, ctx)]
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    assert (want[0] - copy.deepcopy(base)(x, t, ctx)).abs().max() > 1e-3  # the LoRA did something
    assert offload.stats().copies > 0 and cache.stats()["cond"]["computed"] == 2
    offload.remove()
    cache.remove()


def test_guidance_is_chosen_when_the_generator_is_built():
    from lightx2v.engine.guidance import BatchedCFG, SequentialCFG

    seq = LightX2VPipeline().create_generator(**SMALL, cfg_batch=False)
    bat = LightX2VPipeline().create_generator(**SMALL, cfg_batch=True)
    assert type(seq.runner.transformer.guidance) is SequentialCFG
    assert type(bat.runner.transformer.guidance) is BatchedCFG
    cached = LightX2VPipeline().create_generator(**SMALL, cfg_batch=True, feature_caching="Tea", teacache_thresh=0.0,
                                                 coefficients=[1.0, 0.0], use_ret_steps=True)
    assert type(cached.runner.transformer.guidance) is SequentialCFG  # per-branch caches need the branches apart
    assert (_gen(seq) - _gen(bat)).abs().max() < 1e-4


# --- 6. progress and cancel ----------------------------------------------------------------------------------------

def test_cancel_stops_at_the_next_step_and_frees_what_it_held():
    pipe = LightX2VPipeline().create_generator(**{**SMALL, "infer_steps": 10}, cpu_offload=True,
                                               offload_granularity="model")
    forwards, events = [], []
    pipe.runner.transformer.dit.register_forward_pre_hook(lambda m, a: forwards.append(1))
    token = CancelToken()

    def progress(stage, done, total):
        events.append((stage, done, total))
        if done == 2:
            token.cancel("stopped by the test")

    with pytest.raises(Cancelled, match="stopped by the test"):
        _gen(pipe, callback=progress, cancel=token)
    assert events == [("denoise", 1, 10), ("denoise", 2, 10)]
    assert len(forwards) == 2 * 2  # two steps with CFG (cond + uncond), nothing after the cancel
    assert pipe.runner.transformer.experts[0].offload.resident_blocks() == []  # the DiT left the device again
    # a token that is already set stops the request before any stage runs
    calls = []
    with pytest.raises(Cancelled):
        pipe.runner.encoder.text_encoder.obj.model.register_forward_pre_hook(lambda m, a: calls.append(1))
        _gen(pipe, cancel=token)
    assert calls == []
    # the next request works, and equals a fresh generator's
    forwards.clear()
    events.clear()
    out = _gen(pipe, callback=progress, infer_steps=3)
    assert [e[1] for e in events] == [1, 2, 3] and len(forwards) == 6
    fresh = LightX2VPipeline().create_generator(**SMALL, cpu_offload=True, offload_granularity="model")
    assert torch.equal(out, _gen(fresh))
