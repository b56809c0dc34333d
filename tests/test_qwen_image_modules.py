"""Qwen-Image modules against diffusers at tiny random configs, CPU float32: the MMDiT, the VAE (encode/decode of
images, and the 3D causal path on a clip), the scheduler; strict loading and config checks."""

import json

import pytest
import torch
from qwen_reference import rel_max, tiny_diffusers_dit, tiny_diffusers_vae, tiny_scheduler

from lightx2v.errors import CheckpointError, UserError
from lightx2v.models.qwen_image.arch import QwenImageDiTConfig, QwenImageVAEConfig
from lightx2v.models.qwen_image.checkpoint import load_dit
from lightx2v.models.qwen_image.dit import QwenImageDiT
from lightx2v.models.qwen_image.scheduler import FlowMatchConfig, QwenImageScheduler
from lightx2v.models.qwen_image.vae import load_qwen_image_vae
from lightx2v.ops.attention import get_attention_backend

TOL = 1e-4


def _attn(head_dim=16):
    return get_attention_backend("torch_sdpa", dtype=torch.float32, head_dim=head_dim, device=torch.device("cpu"))


def _ours_from(ref):
    cfg = QwenImageDiTConfig.from_diffusers_config(dict(ref.config))
    ours = QwenImageDiT(cfg, _attn(cfg.head_dim)).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)  # the release's names: no renaming
    return ours


def _dit_inputs(shapes, txt_len=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = sum(f * h * w for f, h, w in shapes)
    return (torch.randn(1, n, 64, generator=g), torch.randn(1, txt_len, 32, generator=g) * 2,
            torch.tensor([0.63]))


@pytest.mark.parametrize("zero_cond_t", [False, True])
def test_dit_matches_diffusers(zero_cond_t):
    ref = tiny_diffusers_dit(zero_cond_t=zero_cond_t)
    ours = _ours_from(ref)
    # the generated image (odd token grid: the centred positions' -(n - n//2) side) and two condition images
    shapes = [(1, 5, 4), (1, 4, 6), (1, 3, 3)]
    x, ctx, t = _dit_inputs(shapes)
    with torch.no_grad():
        want = ref(hidden_states=x, encoder_hidden_states=ctx, encoder_hidden_states_mask=None, timestep=t,
                   img_shapes=[shapes], return_dict=False)[0]
        got = ours(x, ctx, t, shapes)
        assert rel_max(got, want) <= TOL
        # can fail: the text, the timestep and a condition image's position each move the output far
        other_text = ours(x, ctx.flip(1), t, shapes)
        other_t = ours(x, ctx, torch.tensor([0.2]), shapes)
        swapped = [shapes[0], shapes[2], shapes[1]]
        x_swapped = torch.cat([x[:, :20], x[:, 44:], x[:, 20:44]], dim=1)
        other_pos = ours(x_swapped, ctx, t, swapped)[:, :20]
    for other in (other_text, other_t):
        assert rel_max(other, want) > 100 * TOL
    assert rel_max(other_pos, want[:, :20]) > 100 * TOL


def test_dit_t2i_single_image_and_rope_reuse():
    ref = tiny_diffusers_dit(seed=5)
    ours = _ours_from(ref)
    shapes = [(1, 6, 8)]
    x, ctx, t = _dit_inputs(shapes, txt_len=3)
    with torch.no_grad():
        want = ref(hidden_states=x, encoder_hidden_states=ctx, encoder_hidden_states_mask=None, timestep=t,
                   img_shapes=[shapes], return_dict=False)[0]
        rope = ours.rope(shapes, 3)
        assert rel_max(ours(x, ctx, t, shapes, rope), want) <= TOL
    assert isinstance(ours.transformer_blocks[0].attn.to_q, torch.nn.Linear)  # hooks reach plain Linears


def _save_dit(ref, folder):
    folder = folder / "transformer"
    ref.save_pretrained(str(folder))
    return folder.parent


def test_dit_loader_is_strict(tmp_path):
    from safetensors.torch import load_file, save_file

    ref = tiny_diffusers_dit()
    root = _save_dit(ref, tmp_path)
    dit = load_dit(root, attn=_attn())
    assert all(torch.equal(dit.state_dict()[k], v) for k, v in ref.state_dict().items())
    weights = root / "transformer" / "diffusion_pytorch_model.safetensors"
    sd = load_file(str(weights))
    sd.pop("transformer_blocks.1.attn.to_k.bias")
    sd["transformer_blocks.0.extra.weight"] = torch.zeros(2)
    sd["proj_out.weight"] = torch.zeros(3, 3)
    save_file(sd, str(weights))
    with pytest.raises(CheckpointError) as e:
        load_dit(root, attn=_attn())
    msg = str(e.value)
    assert "transformer_blocks.1.attn.to_k.bias" in msg and "transformer_blocks.0.extra.weight" in msg
    assert "proj_out.weight" in msg


def test_dit_config_checks():
    base = QwenImageDiTConfig().to_diffusers_config()
    for key, value in (("guidance_embeds", True), ("use_layer3d_rope", True), ("use_additional_t_cond", True),
                       ("some_new_key", 1)):
        with pytest.raises(CheckpointError, match=key):
            QwenImageDiTConfig.from_diffusers_config({**base, key: value})
    with pytest.raises(CheckpointError, match="in_channels"):
        QwenImageDiTConfig.from_diffusers_config({**base, "in_channels": 32})
    with pytest.raises(CheckpointError, match="axes_dims_rope"):
        QwenImageDiTConfig.from_diffusers_config({**base, "axes_dims_rope": [16, 56, 48]})
    cfg = QwenImageDiTConfig.from_diffusers_config(base)
    assert (cfg.inner_dim, cfg.num_layers, cfg.joint_attention_dim) == (3072, 60, 3584)
    with torch.device("meta"):
        dit = QwenImageDiT(cfg, _attn(cfg.head_dim))
    assert round(sum(p.numel() for p in dit.parameters()) / 1e9, 2) == 20.43  # the 20B release


def test_dit_bf16_follows_diffusers_bf16():
    """In bf16 both round the timestep as the reference does; ours keeps modulation and residuals in float32."""
    ref = tiny_diffusers_dit(seed=8).to(torch.bfloat16)
    ours = _ours_from(ref).to(torch.bfloat16)
    shapes = [(1, 6, 8)]
    x, ctx, t = _dit_inputs(shapes)
    with torch.no_grad():
        want = ref(hidden_states=x.bfloat16(), encoder_hidden_states=ctx.bfloat16(), timestep=t.bfloat16(),
                   img_shapes=[shapes], return_dict=False)[0]
        got = ours(x, ctx, t, shapes)
    assert got.dtype == torch.bfloat16
    assert ((got.float() - want.float()).norm() / want.float().norm()).item() < 2e-2


# --- VAE ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved_vae(tmp_path_factory):
    ref = tiny_diffusers_vae()
    with torch.no_grad():  # non-trivial gammas and biases (the reference's init leaves them 1 and 0)
        g = torch.Generator().manual_seed(11)
        for name, p in ref.named_parameters():
            if name.endswith("gamma"):
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
    folder = tmp_path_factory.mktemp("qwen-vae")
    ref.save_pretrained(str(folder))
    return folder, ref


def test_vae_images_match_diffusers(saved_vae):
    folder, ref = saved_vae
    vae = load_qwen_image_vae(folder)
    g = torch.Generator().manual_seed(0)
    images = torch.rand(1, 3, 48, 80, generator=g) * 2 - 1
    z = torch.randn(1, 16, 6, 10, generator=g)
    with torch.no_grad():
        mu_ref = ref.encode(images[:, :, None]).latent_dist.mode()[:, :, 0]
        dec_ref = ref.decode(z[:, :, None]).sample[:, :, 0]
        mu, dec = vae.encode_raw(images), vae.decode_raw(z)
        assert rel_max(mu, mu_ref) <= TOL
        assert rel_max(dec, dec_ref) <= TOL
        # the pipelines' normalisation
        mean = torch.tensor(ref.config.latents_mean).view(1, 16, 1, 1)
        std = torch.tensor(ref.config.latents_std).view(1, 16, 1, 1)
        assert torch.allclose(vae.encode(images), (mu_ref - mean) / std, rtol=0, atol=1e-4)
        assert torch.allclose(vae.decode(z), ref.decode((z / (1.0 / std) + mean)[:, :, None]).sample[:, :, 0],
                              rtol=0, atol=1e-4)
        # can fail: another image / latent gives far-off results
        assert rel_max(vae.encode_raw(images.flip(-1)), mu_ref) > 100 * TOL
        assert rel_max(vae.decode_raw(z.flip(-1)), dec_ref) > 100 * TOL


def test_vae_video_path_is_wans(saved_vae):
    folder, ref = saved_vae
    wan = load_qwen_image_vae(folder).to_wan_vae()
    g = torch.Generator().manual_seed(1)
    video = torch.rand(1, 3, 5, 32, 32, generator=g) * 2 - 1
    z = torch.randn(1, 16, 3, 4, 4, generator=g)
    with torch.no_grad():
        assert rel_max(wan.encode_raw(video), ref.encode(video).latent_dist.mode()) <= TOL
        assert rel_max(wan.decode_raw(z), ref.decode(z).sample) <= TOL


def test_vae_halves_load_alone_and_strictly(saved_vae, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    folder, _ = saved_vae
    enc = load_qwen_image_vae(folder, parts=["encoder"])
    dec = load_qwen_image_vae(folder, parts=["decoder"])
    assert {k.split(".")[0] for k in enc.state_dict()} == {"encoder", "conv1"}
    assert {k.split(".")[0] for k in dec.state_dict()} == {"decoder", "conv2"}
    with pytest.raises(RuntimeError, match="decoder"):
        enc.decode(torch.zeros(1, 16, 2, 2))
    bad = tmp_path / "vae"
    shutil.copytree(folder, bad)
    weights = bad / "diffusion_pytorch_model.safetensors"
    sd = load_file(str(weights))
    sd.pop("decoder.up_blocks.0.resnets.0.conv1.bias")
    sd["encoder.conv_in.weight"] = sd["encoder.conv_in.weight"][:4]
    save_file(sd, str(weights))
    with pytest.raises(CheckpointError) as e:
        load_qwen_image_vae(bad)
    assert "decoder.up_blocks.0.resnets.0.conv1.bias" in str(e.value)  # reported in the release's names
    assert "encoder.conv_in.weight" in str(e.value)
    with pytest.raises(CheckpointError) as e:  # the decoder half does not read (or judge) the encoder's tensors
        load_qwen_image_vae(bad, parts=["decoder"])
    assert "decoder.up_blocks.0.resnets.0.conv1.bias" in str(e.value) and "encoder.conv_in" not in str(e.value)
    with pytest.raises(CheckpointError, match="encoder.conv_in.weight"):
        load_qwen_image_vae(bad, parts=["encoder"])
    cfg = json.loads((folder / "config.json").read_text())
    with pytest.raises(CheckpointError, match="input_channels"):
        QwenImageVAEConfig.from_diffusers_config({**cfg, "input_channels": 4})


# --- scheduler ------------------------------------------------------------------------------------------------


def test_scheduler_matches_diffusers_schedule():
    import numpy as np
    from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

    ref = tiny_scheduler()
    cfg = FlowMatchConfig.from_diffusers_config(dict(ref.config))
    for steps, seq in ((50, 6032), (8, 4096), (3, 64), (2, 9000)):
        mu = calculate_shift(seq, ref.config.base_image_seq_len, ref.config.max_image_seq_len,
                             ref.config.base_shift, ref.config.max_shift)
        ref.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
        ours = QwenImageScheduler(cfg)
        ours.set_timesteps(steps, image_seq_len=seq)
        assert torch.equal(ours.timesteps, ref.timesteps) and torch.equal(ours.sigmas, ref.sigmas)
        x, v = torch.randn(2, 5), torch.randn(2, 5)
        ref.set_begin_index(0)
        assert torch.equal(ours.step(v, x), ref.step(v, ref.timesteps[0], x, return_dict=False)[0])
    other = QwenImageScheduler(cfg)
    other.set_timesteps(8, image_seq_len=256)
    ours.set_timesteps(8, image_seq_len=4096)
    assert (other.sigmas - ours.sigmas).abs().max() > 0.02  # the shift depends on the resolution
    fixed = QwenImageScheduler(cfg)
    fixed.set_timesteps(4, image_seq_len=4096, sample_shift=3.0)  # LightX2V's sample_shift: s -> 3s / (1 + 2s)
    base = torch.linspace(1, 0.25, 4)
    assert torch.allclose(fixed.sigmas[:-1], 3 * base / (1 + 2 * base), atol=1e-6) and fixed.sigmas[-1] == 0
    with pytest.raises(UserError, match="infer_steps"):
        ours.set_timesteps(1, image_seq_len=100)
    with pytest.raises(CheckpointError, match="use_karras_sigmas"):
        FlowMatchConfig.from_diffusers_config({**dict(ref.config), "use_karras_sigmas": True})
