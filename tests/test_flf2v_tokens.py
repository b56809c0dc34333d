"""FLF2V with a CLIP of another token count: the image position embedding length comes from the checkpoint
(diffusers' pos_embed_seq_len; the Wan layout's stored img_emb.emb_pos), in both layouts, against diffusers."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from lightx2v import LightX2VPipeline
from lightx2v.convert import convert_checkpoint
from lightx2v.errors import CheckpointError
from lightx2v.models.wan.arch import WanDiTConfig
from lightx2v.models.wan.checkpoint import WAN_DIT_WEIGHTS, read_dit_config
from tiny_reference import FLOW_SHIFT, build_diffusers_wan_i2v_pipeline, picture

pytest.importorskip("diffusers")

H, W, F, STEPS = 32, 48, 5, 3
CLIP_SIZE = 112  # (112 / 14)**2 + 1 = 65 CLIP tokens per image, not ViT-H/14's 257
TOKENS = (CLIP_SIZE // 14) ** 2 + 1


@pytest.fixture(scope="module")
def flf(tmp_path_factory):
    d = tmp_path_factory.mktemp("flf65")
    pipe = build_diffusers_wan_i2v_pipeline(d / "tok", flf=True, clip_image_size=CLIP_SIZE)
    pipe.save_pretrained(d / "diffusers")
    wan = convert_checkpoint(d / "diffusers", d / "wan", layout="wan")
    return d / "diffusers", wan, pipe


def _ours(model_dir, first, last):
    pipe = LightX2VPipeline(model_path=model_dir, model_cls="wan2.1", task="flf2v")
    pipe.create_generator(device="cpu", sample_shift=FLOW_SHIFT, height=H, width=W, num_frames=F, infer_steps=STEPS,
                          guidance_scale=5.0)
    frames = pipe.generate(seed=5, prompt="a cat", negative_prompt="", image_path=first, last_frame_path=last,
                              return_result_tensor=True, progress=False)["video"]
    return frames, pipe


def test_emb_pos_length_read_in_both_layouts(flf):
    diffusers_dir, wan_dir, _ = flf
    assert json.loads((diffusers_dir / "transformer" / "config.json").read_text())["pos_embed_seq_len"] == 2 * TOKENS
    assert read_dit_config(diffusers_dir, "diffusers").image_pos_len == 2 * TOKENS
    # the Wan layout: the release's config.json has no such key; the stored emb_pos says it
    cfg = json.loads((wan_dir / "config.json").read_text())
    cfg.pop("pos_embed_seq_len", None)
    (wan_dir / "config.json").write_text(json.dumps(cfg))
    assert read_dit_config(wan_dir, "wan").image_pos_len == 2 * TOKENS
    assert load_file(str(wan_dir / f"{WAN_DIT_WEIGHTS}.safetensors"))["img_emb.emb_pos"].shape == (1, 2 * TOKENS, 160)
    # the default is still the release's 2 x 257, and an odd or non-FLF2V length is refused
    assert WanDiTConfig(model_type="flf2v", in_dim=36).image_pos_len == 514
    with pytest.raises(CheckpointError, match="even integer"):
        WanDiTConfig(model_type="flf2v", in_dim=36, image_pos_len=65)
    with pytest.raises(CheckpointError, match="only for FLF2V"):
        WanDiTConfig(model_type="i2v", in_dim=36, image_pos_len=130)


def test_flf2v_other_clip_token_count_matches_diffusers(flf):
    diffusers_dir, wan_dir, pipe = flf
    first, last = picture(48, 32, 4), picture(48, 32, 5)
    out = pipe(image=first, last_image=last, prompt="a cat", negative_prompt="", height=H, width=W, num_frames=F,
               num_inference_steps=STEPS, guidance_scale=5.0, generator=torch.Generator().manual_seed(5),
               output_type="np")
    want = torch.from_numpy(np.asarray(out.frames[0]))
    got, ours = _ours(diffusers_dir, first, last)
    assert ours.runner.transformer.dit.img_emb.emb_pos.shape == (1, 2 * TOKENS, 160)
    assert (got - want).abs().max().item() <= 5e-3
    got_wan, _ = _ours(wan_dir, first, last)
    assert (got_wan - want).abs().max().item() <= 5e-3
    # the last frame matters: another picture moves the video far beyond the tolerance
    other, _ = _ours(diffusers_dir, first, picture(48, 32, 6))
    assert (other - want).abs().max().item() > 5e-2


def test_wan_config_disagreeing_with_stored_emb_pos(flf, tmp_path):
    _, wan_dir, _ = flf
    import shutil

    bad = tmp_path / "wan"
    shutil.copytree(wan_dir, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["pos_embed_seq_len"] = 514
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="disagrees with the stored img_emb.emb_pos"):
        read_dit_config(bad, "wan")
    # without the key, the stored emb_pos decides (here the release's 2 x 257)
    sd = load_file(str(bad / f"{WAN_DIT_WEIGHTS}.safetensors"))
    sd["img_emb.emb_pos"] = torch.zeros(1, 514, 160)
    cfg.pop("pos_embed_seq_len")
    (bad / "config.json").write_text(json.dumps(cfg))
    save_file(sd, str(bad / f"{WAN_DIT_WEIGHTS}.safetensors"))
    assert read_dit_config(bad, "wan").image_pos_len == 514
