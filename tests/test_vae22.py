"""The Wan2.2 (TI2V-5B) VAE against diffusers' AutoencoderKLWan(is_residual=True, patch_size=2): tiny random weights,
CPU float32. Also the channels-last / fused-norm execution path of both VAEs against the plain one (CPU)."""

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

from lightx2v.errors import CheckpointError, UserError
from lightx2v.models.wan import vae as vae_mod
from lightx2v.models.wan.vae import (
    WAN22_LATENTS_MEAN,
    WAN22_LATENTS_STD,
    WAN22_VAE_FILE,
    TilingConfig,
    WanVAE,
    WanVAEConfig,
    load_wan_vae,
    save_wan_vae,
    vae_rename_table,
    vae_state_dict_from_diffusers,
    vae_state_dict_to_diffusers,
)
from tiny_reference import diffusers_vae_for_parity, rel_max

diffusers = pytest.importorskip("diffusers")
from diffusers.models.autoencoders.autoencoder_kl_wan import AvgDown3D, DupUp3D

# Wan2.2's structure (dim_mult 1,2,4,4; temporal levels 1 and 2; 2x2 patches; residual levels; a decoder wider than
# the encoder), tiny widths. z_dim 48 so that a saved original-layout file loads without a config (Wan2.2's stats).
TINY22 = dict(base_dim=8, decoder_base_dim=6, z_dim=48, dim_mult=[1, 2, 4, 4], num_res_blocks=1, attn_scales=[],
              temperal_downsample=[False, True, True], is_residual=True, patch_size=2, in_channels=12,
              out_channels=12, scale_factor_spatial=16, scale_factor_temporal=4,
              latents_mean=list(WAN22_LATENTS_MEAN), latents_std=list(WAN22_LATENTS_STD))
TOL = 1e-5
H, W = 48, 64  # -> latents 3 x 4


@pytest.fixture(autouse=True, scope="module")
def _one_cpu_thread():
    """Tiny convolutions: one thread is fastest and steadiest on a busy machine (restored afterwards)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)




@pytest.fixture(scope="module")
def ref():
    return diffusers_vae_for_parity(TINY22)


@pytest.fixture(scope="module")
def ref_dir(ref, tmp_path_factory):
    path = tmp_path_factory.mktemp("diffusers22") / "vae"
    ref.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def ours(ref_dir):
    return load_wan_vae(ref_dir)


def _video(frames, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, 3, frames, H, W, generator=g) * 2 - 1


def _latents(frames, seed=2):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 48, frames, H // 16, W // 16, generator=g)


def _stats(ref):
    mean = torch.tensor(ref.config.latents_mean).view(1, ref.config.z_dim, 1, 1, 1)
    inv_std = 1.0 / torch.tensor(ref.config.latents_std).view(1, ref.config.z_dim, 1, 1, 1)
    return mean, inv_std


# --- config ---------------------------------------------------------------------------------------------------------

# Wan-AI/Wan2.2-TI2V-5B-Diffusers vae/config.json (clip_output: a key diffusers ignores; it always clamps)
WAN22_DIFFUSERS_CONFIG = {
    "_class_name": "AutoencoderKLWan", "_diffusers_version": "0.35.0.dev0", "attn_scales": [], "base_dim": 160,
    "clip_output": False, "decoder_base_dim": 256, "dim_mult": [1, 2, 4, 4], "dropout": 0.0, "in_channels": 12,
    "is_residual": True, "latents_mean": list(WAN22_LATENTS_MEAN), "latents_std": list(WAN22_LATENTS_STD),
    "num_res_blocks": 2, "out_channels": 12, "patch_size": 2, "scale_factor_spatial": 16, "scale_factor_temporal": 4,
    "temperal_downsample": [False, True, True], "z_dim": 48,
}


def test_wan22_config_from_diffusers():
    cfg = WanVAEConfig.from_diffusers_config(WAN22_DIFFUSERS_CONFIG)
    assert cfg == WanVAEConfig.wan22()
    assert (cfg.z_dim, cfg.spatial_factor, cfg.temporal_factor, cfg.in_channels) == (48, 16, 4, 12)
    assert cfg.is_residual and cfg.patch_size == 2 and cfg.decoder_base_dim == 256 and cfg.base_dim == 160
    assert cfg.checkpoint_file == WAN22_VAE_FILE == "Wan2.2_VAE.pth"
    assert len(WAN22_LATENTS_MEAN) == len(WAN22_LATENTS_STD) == 48
    assert WanVAEConfig.from_diffusers_config(cfg.to_diffusers_config()) == cfg


def test_full_size_structure_is_diffusers_and_original():
    """The real Wan2.2 VAE on the meta device: the rename table maps our parameters exactly onto diffusers'
    (names and shapes), and the original names are those of Wan2.2's vae2_2.py (a sample, with shapes)."""
    cfg = WanVAEConfig.wan22()
    with torch.device("meta"):
        ref = diffusers.AutoencoderKLWan.from_config(cfg.to_diffusers_config())
        ours = WanVAE(cfg)
    sd = ours.state_dict()
    dif = vae_state_dict_to_diffusers(sd, cfg)
    assert {k: v.shape for k, v in dif.items()} == {k: v.shape for k, v in ref.state_dict().items()}
    assert len(sd) == 196
    assert set(sd) <= set(vae_rename_table(cfg))
    for key, shape in {
        "encoder.conv1.weight": (160, 12, 3, 3, 3),
        "encoder.downsamples.0.downsamples.0.residual.0.gamma": (160, 1, 1, 1),
        "encoder.downsamples.0.downsamples.2.resample.1.weight": (160, 160, 3, 3),
        "encoder.downsamples.1.downsamples.0.shortcut.weight": (320, 160, 1, 1, 1),
        "encoder.downsamples.1.downsamples.2.time_conv.weight": (320, 320, 3, 1, 1),
        "encoder.downsamples.3.downsamples.1.residual.6.weight": (640, 640, 3, 3, 3),
        "encoder.head.2.weight": (96, 640, 3, 3, 3),
        "conv1.weight": (96, 96, 1, 1, 1),
        "conv2.weight": (48, 48, 1, 1, 1),
        "decoder.conv1.weight": (1024, 48, 3, 3, 3),
        "decoder.middle.1.to_qkv.weight": (3072, 1024, 1, 1),
        "decoder.upsamples.0.upsamples.3.time_conv.weight": (2048, 1024, 3, 1, 1),
        "decoder.upsamples.0.upsamples.3.resample.1.weight": (1024, 1024, 3, 3),
        "decoder.upsamples.2.upsamples.0.shortcut.weight": (512, 1024, 1, 1, 1),
        "decoder.upsamples.2.upsamples.3.resample.1.weight": (512, 512, 3, 3),
        "decoder.upsamples.3.upsamples.2.residual.6.weight": (256, 256, 3, 3, 3),
        "decoder.head.2.weight": (12, 256, 3, 3, 3),
    }.items():
        assert tuple(sd[key].shape) == shape, key
    assert "decoder.upsamples.2.upsamples.3.time_conv.weight" not in sd  # the third up level is spatial only
    assert "decoder.upsamples.3.upsamples.3.resample.1.weight" not in sd  # no upsampler after the last level
    assert WanVAEConfig.from_state_dict(sd) == cfg


def test_config_roundtrip_through_diffusers(ours, ref):
    cfg = ours.config
    assert cfg == WanVAEConfig.from_diffusers_config(TINY22)
    assert (cfg.spatial_factor, cfg.decoder_base_dim) == (16, 6)
    model = diffusers.AutoencoderKLWan.from_config(cfg.to_diffusers_config())
    assert WanVAEConfig.from_diffusers_config(dict(model.config)) == cfg
    assert set(vae_state_dict_to_diffusers(ours.state_dict(), cfg)) == set(ref.state_dict())


@pytest.mark.parametrize("key,value,match", [
    ("in_channels", 3, "in_channels=3"),  # patch_size 2 needs 12
    ("out_channels", 3, "out_channels=3"),
    ("scale_factor_spatial", 8, "scale_factor_spatial=8"),
    ("patch_size", 0, "patch_size"),
    ("dim_mult", [1, 3, 4, 4], "encoder level 1"),  # a shortcut whose channel regrouping does not divide
    ("dim_mult", [1, 2, 3, 4], "decoder level 2"),
])
def test_config_rejects_inconsistent_wan22_values(key, value, match):
    with pytest.raises(UserError, match=match):
        WanVAEConfig.from_diffusers_config(dict(TINY22, **{key: value}))


def test_config_without_in_channels_means_3():
    d = {k: v for k, v in TINY22.items() if k not in ("in_channels", "out_channels")}
    with pytest.raises(UserError, match="in_channels=3"):  # diffusers' default: would not fit 2x2 patches
        WanVAEConfig.from_diffusers_config(d)


@pytest.mark.parametrize("kw", [
    dict(),
    dict(base_dim=4, decoder_base_dim=8, num_res_blocks=2),
    dict(dim_mult=(1, 2, 2), temperal_downsample=(True, False), patch_size=None),
])
def test_wan22_checkpoint_architecture_is_inferred(kw):
    cfg = dataclasses.replace(WanVAEConfig.from_diffusers_config(TINY22), **kw)
    with torch.device("meta"):
        sd = WanVAE(cfg).state_dict()
    assert WanVAEConfig.from_state_dict(sd) == cfg
    with pytest.raises(CheckpointError, match="infer"):
        WanVAEConfig.from_state_dict({k: v for k, v in sd.items() if k != "decoder.head.0.gamma"})


def test_unknown_z_dim_has_no_statistics():
    cfg = dataclasses.replace(WanVAEConfig.from_diffusers_config(TINY22), z_dim=6, latents_mean=(0.0,) * 6,
                              latents_std=(1.0,) * 6)
    with torch.device("meta"):
        sd = WanVAE(cfg).state_dict()
    with pytest.raises(CheckpointError, match="z_dim=6"):
        WanVAEConfig.from_state_dict(sd)


# --- numerics against diffusers ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("frames", [1, 9])
def test_encode_matches_diffusers_pipeline(ref, ours, frames):
    video = _video(frames)
    mean, inv_std = _stats(ref)
    with torch.no_grad():  # WanImageToVideoPipeline.prepare_latents: argmax (the mean), then normalised
        want = (ref.encode(video).latent_dist.mode() - mean) * inv_std
    got = ours.encode(video)
    assert got.shape == want.shape == (1, 48, 1 + (frames - 1) // 4, H // 16, W // 16)
    err = rel_max(got, want)
    print(f"{frames} frames: encode rel err {err:.3g}")
    assert err <= TOL
    assert rel_max(ours.encode_raw(video), (want / inv_std + mean)) <= TOL


@pytest.mark.parametrize("frames", [1, 3])
def test_decode_matches_diffusers_pipeline(ref, ours, frames):
    latents = _latents(frames)
    mean, inv_std = _stats(ref)
    with torch.no_grad():  # WanPipeline.__call__'s end: latents / latents_std + latents_mean, then decode
        want = ref.decode(latents / inv_std + mean).sample
    got = ours.decode(latents)
    assert got.shape == want.shape == (1, 3, 1 + 4 * (frames - 1), H, W)
    assert got.abs().max() <= 1 and (want.abs() < 1).float().mean() > 0.8  # clamped, but mostly not at +-1
    err = rel_max(got, want)
    print(f"{frames} latent frames: decode rel err {err:.3g}")
    assert err <= TOL


def test_tolerance_is_meaningful(ours):
    """Other inputs move the outputs far beyond TOL, through the cache too; causality holds."""
    video, latents = _video(9), _latents(3)
    z = ours.encode_raw(video)
    v2 = video.clone()
    v2[:, :, 0] += 0.5
    z2 = ours.encode_raw(v2)
    assert all(rel_max(z2[:, :, t], z[:, :, t]) > 100 * TOL for t in (0, 1, 2))
    v3 = video.clone()
    v3[:, :, 5:] = 0
    assert torch.equal(ours.encode_raw(v3)[:, :, :2], z[:, :, :2])

    x = ours.decode_raw(latents)
    l2 = latents.clone()
    l2[:, :, 0] += 1.0
    assert rel_max(ours.decode_raw(l2)[:, :, 5:], x[:, :, 5:]) > 100 * TOL  # frames of the last latent frame only
    l3 = latents.clone()
    l3[:, :, 2] = 0
    assert torch.equal(ours.decode_raw(l3)[:, :, :5], x[:, :, :5])


def test_shapes_are_checked(ours):
    with pytest.raises(UserError, match="divisible by 16"):
        ours.encode(torch.zeros(1, 3, 1, 40, 64))
    with pytest.raises(UserError, match="latents"):
        ours.decode(torch.zeros(1, 16, 2, 3, 4))


# --- tiling -----------------------------------------------------------------------------------------------------------

# (tile_h, tile_w, stride_h, stride_w) in pixels; diffusers divides them by the patch size on the pixel side
SETTINGS = [(32, 32, 16, 16), (48, 32, 32, 16)]


@pytest.mark.parametrize("setting", SETTINGS)
def test_tiled_decode_matches_diffusers(ref, ours, setting):
    t = TilingConfig(*setting)
    latents = _latents(2)
    ref.enable_tiling(**dataclasses.asdict(t))
    try:
        with torch.no_grad():
            want = ref.decode(latents).sample
    finally:
        ref.disable_tiling()
    got = ours.decode_raw(latents, tiling=t)
    assert got.shape == want.shape == (1, 3, 5, H, W)
    assert rel_max(got, want) <= TOL
    assert rel_max(got, ours.decode_raw(latents)) > 100 * TOL  # tiling does change the result


@pytest.mark.parametrize("setting", SETTINGS + [(24, 40, 8, 24)])  # encode: multiples of 8 suffice
def test_tiled_encode_matches_diffusers(ref, ours, setting):
    t = TilingConfig(*setting)
    video = _video(5)
    ref.enable_tiling(**dataclasses.asdict(t))
    try:
        with torch.no_grad():
            want = ref.encode(video).latent_dist.mode()
    finally:
        ref.disable_tiling()
    got = ours.encode_raw(video, tiling=t)
    assert got.shape == want.shape == (1, 48, 2, H // 16, W // 16)
    assert rel_max(got, want) <= TOL
    assert rel_max(got, ours.encode_raw(video)) > 100 * TOL


def test_decode_tiles_must_be_whole_latent_pixels(ours):
    with pytest.raises(UserError, match="multiples of 16"):
        ours.decode_raw(_latents(1), TilingConfig(24, 40, 8, 24))


# --- state dicts, loading, saving -------------------------------------------------------------------------------------


def test_state_dict_roundtrip(ref, ours):
    cfg = ours.config
    dif = vae_state_dict_to_diffusers(ours.state_dict(), cfg)
    ref_sd = ref.state_dict()
    assert set(dif) == set(ref_sd) and all(torch.equal(dif[k], ref_sd[k]) for k in ref_sd)
    back = vae_state_dict_from_diffusers(dif, cfg)
    assert list(back) == list(ours.state_dict())


def test_save_both_layouts_and_reload(ours, tmp_path):
    video, latents = _video(5), _latents(2)
    want_z, want_x = ours.encode(video), ours.decode(latents)

    path = save_wan_vae(ours, tmp_path, layout="wan")  # a folder: the file gets Wan2.2's name
    assert path == tmp_path / "Wan2.2_VAE.pth"
    again = load_wan_vae(tmp_path)  # no config: inferred from the tensors, Wan2.2's latent statistics
    assert again.config == ours.config
    assert torch.equal(again.encode(video), want_z) and torch.equal(again.decode(latents), want_x)

    out = save_wan_vae(ours, tmp_path / "vae", layout="diffusers")
    model = diffusers.AutoencoderKLWan.from_pretrained(out)
    assert WanVAEConfig.from_diffusers_config(dict(model.config)) == ours.config
    with torch.no_grad():
        assert rel_max(model.decode(latents).sample, ours.decode_raw(latents)) <= TOL
    again = load_wan_vae(out, dtype=torch.bfloat16)
    assert again.dtype == torch.bfloat16
    assert all(torch.equal(a, b.to(torch.bfloat16)) for a, b in zip(again.state_dict().values(),
                                                                     ours.state_dict().values()))


def test_folder_with_both_vae_files_is_ambiguous(ours, tmp_path):
    save_wan_vae(ours, tmp_path, layout="wan")
    (tmp_path / "Wan2.1_VAE.pth").write_bytes((tmp_path / "Wan2.2_VAE.pth").read_bytes())
    with pytest.raises(UserError, match="both"):
        load_wan_vae(tmp_path)


def test_strict_loading_names_every_problem(ours, tmp_path):
    sd = dict(ours.state_dict())
    bad = dict(sd)
    del bad["decoder.upsamples.1.upsamples.2.time_conv.bias"]
    bad["encoder.downsamples.0.avg_shortcut.weight"] = torch.zeros(1)
    bad["conv2.weight"] = torch.zeros(48, 48, 1, 1, 2)
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError) as e:
        load_wan_vae(tmp_path / "bad.pth", config=ours.config)
    msg = str(e.value)
    assert "missing keys: decoder.upsamples.1.upsamples.2.time_conv.bias" in msg
    assert "unexpected keys: encoder.downsamples.0.avg_shortcut.weight" in msg
    assert "conv2.weight (checkpoint (48, 48, 1, 1, 2), model (48, 48, 1, 1, 1))" in msg
    # a Wan2.1-shaped config for a Wan2.2 checkpoint: every key is named
    with pytest.raises(CheckpointError, match=r"unexpected keys: .*encoder\.downsamples\.0\.downsamples\.0\."):
        load_wan_vae(save_wan_vae(ours, tmp_path / "ok.pth"), config=WanVAEConfig(base_dim=8, z_dim=48,
                     latents_mean=WAN22_LATENTS_MEAN, latents_std=WAN22_LATENTS_STD))
    dif = vae_state_dict_to_diffusers(sd, ours.config)
    dif["decoder.up_blocks.0.avg_shortcut.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"decoder\.up_blocks\.0\.avg_shortcut\.weight"):
        vae_state_dict_from_diffusers(dif, ours.config)


def test_diffusers_folder_config_is_checked(ref_dir, tmp_path):
    d = json.loads((ref_dir / "config.json").read_text())
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text(json.dumps(dict(d, in_channels=3)))
    with pytest.raises(UserError, match="in_channels"):
        load_wan_vae(tmp_path / "vae")


# --- the parameter-free shortcuts, and the channels-last path ---------------------------------------------------------


@pytest.mark.parametrize("cin,cout,ft", [(8, 8, 2), (8, 4, 2), (8, 4, 1), (4, 8, 2), (4, 16, 2), (8, 6, 1),
                                         (6, 6, 1)])
@pytest.mark.parametrize("first", [False, True])
@pytest.mark.parametrize("channels_last", [False, True])
def test_dup_up_add_matches_diffusers(cin, cout, ft, first, channels_last):
    """Every repeat ratio r = cout*ft*4/cin: 8 and 4 (broadcast views), 2 and 1 (broadcast), 16 and 3 (repeat)."""
    g = torch.Generator().manual_seed(cin * 100 + cout)
    t = 1 if first else 3
    x = torch.randn(2, cin, t, 3, 5, generator=g)
    want = DupUp3D(cin, cout, ft, 2)(x, first_chunk=first)
    y = torch.randn(want.shape, generator=g)
    if channels_last:
        x, y = x.contiguous(memory_format=torch.channels_last_3d), y.contiguous(memory_format=torch.channels_last_3d)
    got = vae_mod._add_dup_up_(y.clone(), x, ft, 2, first)
    assert torch.equal(got, y + want)


@pytest.mark.parametrize("cin,cout,ft,fs,t", [(4, 8, 2, 2, 4), (4, 8, 2, 2, 1), (4, 4, 1, 2, 3), (8, 8, 1, 1, 2)])
def test_avg_down_matches_diffusers(cin, cout, ft, fs, t):
    x = torch.randn(1, cin, t, 4, 6, generator=torch.Generator().manual_seed(t))
    want = AvgDown3D(cin, cout, ft, fs)(x)
    assert torch.equal(vae_mod._avg_down(x, cout, ft, fs), want)
    got = vae_mod._avg_down(x.contiguous(memory_format=torch.channels_last_3d), cout, ft, fs)
    assert got.is_contiguous(memory_format=torch.channels_last_3d) and torch.equal(got, want)


@pytest.mark.parametrize("wan22", [False, True])
def test_channels_last_and_fused_norm_path_gives_the_same_values(ours, wan22, monkeypatch):
    """The GPU execution path on the CPU: channels-last activations and weights, and the fused residual-block passes
    (conv biases deferred into the next pass; here their PyTorch fallbacks, as CPU tensors select them) give the
    plain path's values to float32 rounding; the weights' values are untouched by the layout changes."""
    if wan22:
        vae, video, latents = ours, _video(5), _latents(2)
    else:
        torch.manual_seed(0)
        vae = WanVAE(WanVAEConfig(base_dim=8, z_dim=4, dim_mult=(1, 2, 2, 2), num_res_blocks=1,
                                  latents_mean=(0.1, 0.2, 0.3, 0.4), latents_std=(1.0, 2.0, 0.5, 1.5))).eval()
        video, latents = torch.rand(1, 3, 5, 32, 48) * 2 - 1, torch.randn(1, 4, 2, 4, 6)
    plain_z, plain_x = vae.encode_raw(video), vae.decode_raw(latents)
    weights = {k: v.clone() for k, v in vae.state_dict().items()}

    def channels_last_layout(self, x):  # what _run_layout does on CUDA
        for m in self.modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d)):
                fmt = torch.channels_last_3d if m.weight.dim() == 5 else torch.channels_last
                m.weight.data = m.weight.data.contiguous(memory_format=fmt)
        self._weights_channels_last = True
        return x.contiguous(memory_format=torch.channels_last_3d)

    calls = {"norm": 0, "residual": 0}
    norm_rows, residual_rows = vae_mod._bias_norm_silu_rows, vae_mod._bias_residual_rows_

    def count(key, fn):
        def wrapped(*a):
            calls[key] += 1
            return fn(*a)
        return wrapped

    conv3d = torch.nn.Conv3d._conv_forward

    def conv3d_channels_last(self, x, weight, bias):  # cuDNN's behaviour (the CPU returns contiguous outputs)
        return conv3d(self, x, weight, bias).contiguous(memory_format=torch.channels_last_3d)

    with monkeypatch.context() as m:
        m.setattr(WanVAE, "_run_layout", channels_last_layout)
        m.setattr(vae_mod, "_use_fused", vae_mod._is_channels_last)  # the CUDA condition without the CUDA part
        m.setattr(torch.nn.Conv3d, "_conv_forward", conv3d_channels_last)
        m.setattr(vae_mod, "_bias_norm_silu_rows", count("norm", norm_rows))
        m.setattr(vae_mod, "_bias_residual_rows_", count("residual", residual_rows))
        cl_z, cl_x = vae.encode_raw(video), vae.decode_raw(latents)
        conv = vae.decoder.conv1.weight
        assert conv.is_contiguous(memory_format=torch.channels_last_3d) and not conv.is_contiguous()
    n_blocks = sum(isinstance(b, vae_mod.ResidualBlock) for b in vae.modules())
    assert calls["residual"] >= n_blocks and calls["norm"] >= 2 * n_blocks  # the fused passes ran (torch fallbacks)
    vae._run_layout(video)  # the real one, on the CPU: converts the weights back
    assert vae.decoder.conv1.weight.is_contiguous()
    assert all(torch.equal(v, weights[k]) for k, v in vae.state_dict().items())
    assert cl_z.is_contiguous() and cl_x.is_contiguous()
    assert rel_max(cl_z, plain_z) <= TOL and rel_max(cl_x, plain_x) <= TOL
    assert torch.equal(vae.encode_raw(video), plain_z) and torch.equal(vae.decode_raw(latents), plain_x)


def test_fused_norm_fallback_equals_the_norm():
    """The fused pass's function, silu(norm(x + bias)) on [pixels, C] rows, is the plain path's; an all-zero pixel
    stays 0 (F.normalize's floor)."""
    norm = vae_mod.RMSNorm(24, 3)
    with torch.no_grad():
        norm.gamma.uniform_(0.5, 1.5)
    x = torch.randn(2, 24, 3, 4, 5)
    bias = torch.randn(24)
    x[0, :, 0, 0, 0] = -bias
    want = torch.nn.functional.silu(norm(x + bias.view(1, -1, 1, 1, 1)))
    out = torch.empty(2, 24, 5, 4, 5).contiguous(memory_format=torch.channels_last_3d)[:, :, 2:]  # a buffer's tail
    xc = x.contiguous(memory_format=torch.channels_last_3d)
    with torch.no_grad():
        for b in range(2):
            vae_mod._bias_norm_silu_rows(vae_mod._pixel_rows(xc[b]), bias, norm.gamma.view(24), norm.scale,
                                         vae_mod._pixel_rows(out[b]))
    assert out[0, :, 0, 0, 0].abs().max() == 0
    assert torch.allclose(out, want, rtol=1e-5, atol=1e-6)


def _interpreter_report() -> dict:
    """Body of the TRITON_INTERPRET=1 subprocess: each Triton pass against its PyTorch fallback, on CPU tensors."""
    report = {}
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float16):
        for r, c, with_bias in ((37, 24, True), (5, 96, False), (3, 130, True)):  # ragged rows, odd widths
            x = torch.randn(r, c, generator=g).to(dtype)
            x[0] = 0
            bias = torch.randn(c, generator=g).to(dtype) if with_bias else None
            gamma = (1 + 0.2 * torch.randn(c, generator=g)).to(dtype)
            got, want = torch.full_like(x, float("nan")), torch.empty_like(x)
            vae_mod._bias_norm_silu_rows(x, bias, gamma, c**0.5, got)  # Triton (interpreted)
            os.environ["TRITON_INTERPRET"] = "0"
            vae_mod._bias_norm_silu_rows(x, bias, gamma, c**0.5, want)  # the fallback
            os.environ["TRITON_INTERPRET"] = "1"
            report[f"norm {dtype} {r}x{c} bias={with_bias}"] = rel_max(got, want)
            h, sc, b = x.clone(), torch.randn(r, c, generator=g).to(dtype), torch.randn(c, generator=g).to(dtype)
            got = h.clone()
            vae_mod._bias_residual_rows_(got, b, sc)
            report[f"residual {dtype} {r}x{c}"] = rel_max(got, h.add_(b).add_(sc))
    return report


def test_fused_passes_under_the_triton_interpreter():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=300,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(report) == 12
    bad = {k: v for k, v in report.items() if not v <= (1e-6 if "float32" in k else 2e-3)}
    assert not bad, bad


def test_cudnn_autotune_is_restored():
    before = torch.backends.cudnn.benchmark
    with vae_mod._cudnn_autotune(True):
        assert torch.backends.cudnn.benchmark
    assert torch.backends.cudnn.benchmark == before
    with pytest.raises(RuntimeError), vae_mod._cudnn_autotune(True):
        raise RuntimeError
    assert torch.backends.cudnn.benchmark == before


if __name__ == "__main__":  # the interpreter subprocess of test_fused_passes_under_the_triton_interpreter
    if os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("run with TRITON_INTERPRET=1")
    print(json.dumps(_interpreter_report()))
