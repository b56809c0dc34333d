"""Our Wan2.1 VAE against diffusers' AutoencoderKLWan: tiny random weights, CPU float32."""

import inspect
import json

import pytest
import torch

from lightx2v.errors import CheckpointError, UserError
from lightx2v.models.wan.vae import (
    CausalCache,
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

# Tiny, but with every block type: downsample2d + two downsample3d, upsample3d x2 + upsample2d, residual blocks with
# and without shortcut convs, and the middle attention. Non-default latent statistics check that they are read.
TINY = dict(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1, attn_scales=[],
            temperal_downsample=[False, True, True], latents_mean=[0.3, -0.7, 1.1, -0.2],
            latents_std=[1.7, 0.6, 2.4, 1.2])
TOL = 1e-4




@pytest.fixture(scope="module")
def ref():
    return diffusers_vae_for_parity(TINY)


@pytest.fixture(scope="module")
def ref_dir(ref, tmp_path_factory):
    path = tmp_path_factory.mktemp("diffusers") / "vae"
    ref.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def ours(ref_dir):
    return load_wan_vae(ref_dir)


@pytest.fixture(scope="module")
def video():
    g = torch.Generator().manual_seed(1)
    return torch.rand(1, 3, 9, 32, 32, generator=g) * 2 - 1  # 9 frames -> 3 latent frames of 4x4


@pytest.fixture(scope="module")
def latents():
    g = torch.Generator().manual_seed(2)
    return torch.randn(1, 4, 3, 4, 4, generator=g)


# --- config ---------------------------------------------------------------------------------------------------------


def test_config_defaults_are_diffusers_defaults():
    sig = inspect.signature(diffusers.AutoencoderKLWan.__init__)
    defaults = {k: p.default for k, p in sig.parameters.items() if k != "self"}
    assert WanVAEConfig.from_diffusers_config(defaults) == WanVAEConfig()
    cfg = WanVAEConfig()
    assert (cfg.spatial_factor, cfg.temporal_factor, cfg.z_dim) == (8, 4, 16)


def test_config_roundtrip_through_diffusers(ours):
    cfg = ours.config
    assert cfg == WanVAEConfig(**TINY)
    model = diffusers.AutoencoderKLWan.from_config(cfg.to_diffusers_config())
    assert WanVAEConfig.from_diffusers_config(dict(model.config)) == cfg
    # The rename table covers exactly diffusers' parameters for this config.
    assert set(vae_state_dict_to_diffusers(ours.state_dict(), cfg)) == set(model.state_dict())


# (is_residual, patch_size with in/out_channels 12, and decoder_base_dim are supported: tests/test_vae22.py)
@pytest.mark.parametrize("key,value", [("in_channels", 4), ("out_channels", 12), ("patch_size", 2),
                                       ("some_new_option", 1), ("attn_scales", [0.5]), ("scale_factor_spatial", 16),
                                       ("scale_factor_temporal", 8), ("is_residual", "yes")])
def test_config_rejects_what_changes_the_architecture(key, value):
    d = dict(TINY, _class_name="AutoencoderKLWan", _diffusers_version="0.42.1", dropout=0.0, **{key: value})
    with pytest.raises(UserError, match=key):
        WanVAEConfig.from_diffusers_config(d)


def test_config_rejects_bad_values():
    with pytest.raises(UserError, match="latents_mean"):
        WanVAEConfig.from_diffusers_config(dict(TINY, latents_mean=[0.0] * 3))
    with pytest.raises(UserError, match="temperal_downsample"):
        WanVAEConfig.from_diffusers_config(dict(TINY, temperal_downsample=[True, True]))
    with pytest.raises(UserError, match="dim_mult"):
        WanVAEConfig.from_diffusers_config(dict(TINY, dim_mult=["x", 2]))


# --- numerics against diffusers ---------------------------------------------------------------------------------------


def test_encode_raw_matches_diffusers(ref, ours, video):
    with torch.no_grad():
        want = ref.encode(video).latent_dist.mode()
    got = ours.encode_raw(video)
    assert got.shape == want.shape == (1, 4, 3, 4, 4)
    err = rel_max(got, want)
    print(f"encode_raw rel err {err:.3g}")
    assert err <= TOL


def test_decode_raw_matches_diffusers(ref, ours, latents):
    with torch.no_grad():
        want = ref.decode(latents).sample
    got = ours.decode_raw(latents)
    assert got.shape == want.shape == (1, 3, 9, 32, 32)
    assert (want.abs() < 1).float().mean() > 0.9  # mostly unclamped: the comparison is not against +-1
    err = rel_max(got, want)
    print(f"decode_raw rel err {err:.3g}")
    assert err <= TOL


def test_normalisation_matches_diffusers_pipeline(ref, ours, video, latents):
    # The formulas of diffusers' WanPipeline / WanImageToVideoPipeline.
    mean = torch.tensor(ref.config.latents_mean).view(1, ref.config.z_dim, 1, 1, 1)
    inv_std = 1.0 / torch.tensor(ref.config.latents_std).view(1, ref.config.z_dim, 1, 1, 1)
    with torch.no_grad():
        want_z = (ref.encode(video).latent_dist.mode() - mean) * inv_std
        want_x = ref.decode(latents / inv_std + mean).sample
    got_z, got_x = ours.encode(video), ours.decode(latents)
    assert rel_max(got_z, want_z) <= TOL
    assert rel_max(got_x, want_x) <= TOL
    # ...and the normalisation is not the identity (would pass trivially with mean 0, std 1).
    assert rel_max(got_z, ours.encode_raw(video)) > 0.1


def test_tolerance_is_meaningful_the_cache_carries_the_past(ours, video, latents):
    """A perturbed first frame must change later frames far beyond TOL (a dropped cache would not)."""
    z = ours.encode_raw(video)
    v2 = video.clone()
    v2[:, :, 0] += 0.5
    z2 = ours.encode_raw(v2)
    for t in (1, 2):  # latent frames made from frames 1-4 and 5-8 only
        assert rel_max(z2[:, :, t], z[:, :, t]) > 100 * TOL
    # Causality: changing the last 4 frames leaves the first two latent frames bit-identical.
    v3 = video.clone()
    v3[:, :, 5:] = 0
    z3 = ours.encode_raw(v3)
    assert torch.equal(z3[:, :, :2], z[:, :, :2]) and rel_max(z3[:, :, 2], z[:, :, 2]) > 100 * TOL

    x = ours.decode_raw(latents)
    l2 = latents.clone()
    l2[:, :, 0] += 1.0
    x2 = ours.decode_raw(l2)
    assert rel_max(x2[:, :, 5:], x[:, :, 5:]) > 100 * TOL  # the frames of the last latent frame
    l3 = latents.clone()
    l3[:, :, 2] = 0
    x3 = ours.decode_raw(l3)
    assert torch.equal(x3[:, :, :5], x[:, :, :5])  # frame 0 and frames 1-4 come from latent frames 0 and 1


def test_successive_calls_are_identical(ours, video, latents):
    assert torch.equal(ours.encode(video), ours.encode(video))
    assert torch.equal(ours.decode(latents), ours.decode(latents))
    # A call in between on another shape does not leak into the next one.
    ours.decode(latents[:, :, :1, :2, :2])
    assert torch.equal(ours.decode_raw(latents), ours.decode_raw(latents))


def test_batch_of_two_matches_one_by_one(ours, video, latents):
    v = torch.cat([video, video.flip(-1)])
    z = ours.encode_raw(v)
    assert rel_max(z[1:], ours.encode_raw(video.flip(-1))) <= TOL and rel_max(z[:1], ours.encode_raw(video)) <= TOL
    x = ours.decode_raw(torch.cat([latents, -latents]))
    assert rel_max(x[1:], ours.decode_raw(-latents)) <= TOL


def test_shapes_are_checked(ours):
    with pytest.raises(UserError, match="frames"):
        ours.encode(torch.zeros(1, 3, 8, 32, 32))
    with pytest.raises(UserError, match="frames"):
        ours.encode(torch.zeros(1, 3, 5, 30, 32))
    with pytest.raises(UserError, match="latents"):
        ours.decode(torch.zeros(1, 16, 2, 4, 4))


def test_causal_cache_reset():
    cache = CausalCache()
    cache.start_chunk()
    assert cache.next_slot() == 0 and cache.next_slot() == 1 and cache.slots == [None, None]
    cache.slots[0] = torch.zeros(1)
    cache.start_chunk()
    assert cache.next_slot() == 0
    with pytest.raises(RuntimeError):  # a chunk that visited fewer layers than the first one
        cache.start_chunk()
    cache.reset()
    assert cache.slots == []
    cache.start_chunk()


def test_bf16_runs_and_is_close(ref_dir, ours, video, latents):
    vae = load_wan_vae(ref_dir, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in vae.parameters())
    z = vae.encode(video)
    x = vae.decode(latents)
    assert z.dtype == x.dtype == torch.bfloat16
    assert rel_max(z, ours.encode(video)) < 5e-2
    assert rel_max(x, ours.decode(latents)) < 5e-2


# --- state dicts, loading, saving -------------------------------------------------------------------------------------


def test_state_dict_roundtrip_wan_diffusers_wan(ref, ours):
    cfg = ours.config
    wan_sd = ours.state_dict()
    dif_sd = vae_state_dict_to_diffusers(wan_sd, cfg)
    back = vae_state_dict_from_diffusers(dif_sd, cfg)
    assert list(back) == list(wan_sd)
    assert all(back[k] is wan_sd[k] for k in wan_sd)
    ref_sd = ref.state_dict()
    assert set(dif_sd) == set(ref_sd) and all(torch.equal(dif_sd[k], ref_sd[k]) for k in ref_sd)


def test_original_wan_key_names():
    with torch.device("meta"):
        sd = WanVAE(WanVAEConfig()).state_dict()
    assert len(sd) == 194
    for key in ["encoder.conv1.weight", "encoder.downsamples.0.residual.0.gamma",
                "encoder.downsamples.2.resample.1.weight", "encoder.downsamples.5.time_conv.weight",
                "encoder.downsamples.3.shortcut.weight", "encoder.middle.1.to_qkv.weight", "encoder.head.2.bias",
                "conv1.weight", "conv2.bias", "decoder.conv1.weight", "decoder.middle.2.residual.6.weight",
                "decoder.upsamples.3.time_conv.weight", "decoder.upsamples.11.resample.1.weight",
                "decoder.upsamples.4.shortcut.weight", "decoder.head.0.gamma"]:
        assert key in sd, key
    assert sd["encoder.downsamples.0.residual.0.gamma"].shape == (96, 1, 1, 1)
    assert sd["decoder.middle.1.norm.gamma"].shape == (384, 1, 1)
    assert set(sd) <= set(vae_rename_table(WanVAEConfig()))


def test_save_wan_layout_and_reload(ours, video, latents, tmp_path):
    path = save_wan_vae(ours, tmp_path / "Wan2.1_VAE.pth", layout="wan")
    assert path.name == "Wan2.1_VAE.pth" and set(torch.load(path, weights_only=True)) == set(ours.state_dict())
    again = load_wan_vae(tmp_path, config=ours.config)  # the folder holding Wan2.1_VAE.pth works too
    assert torch.equal(again.encode(video), ours.encode(video))
    assert torch.equal(again.decode(latents), ours.decode(latents))
    # A config that does not fit: every mis-shaped tensor is named.
    with pytest.raises(CheckpointError, match=r"shape mismatches: conv1\.bias \(checkpoint \(8,\), model \(32,\)\)"):
        load_wan_vae(path, config=WanVAEConfig())
    # Without a config the architecture is inferred, but z_dim=4 has no known latent statistics.
    with pytest.raises(CheckpointError, match="z_dim=4"):
        load_wan_vae(path)


@pytest.mark.parametrize("kw", [
    dict(base_dim=8, dim_mult=(1, 2, 2, 2), num_res_blocks=1),
    dict(base_dim=4, dim_mult=(1, 3, 2), num_res_blocks=2, temperal_downsample=(True, False)),
    dict(),
])
def test_wan_checkpoint_architecture_is_inferred(kw, tmp_path):
    cfg = WanVAEConfig(**kw)
    with torch.device("meta"):
        sd = WanVAE(cfg).state_dict()
    assert WanVAEConfig.from_state_dict(sd) == cfg
    if kw:
        torch.manual_seed(0)
        vae = WanVAE(cfg)
        path = save_wan_vae(vae, tmp_path, layout="wan")
        assert load_wan_vae(path).config == cfg
    with pytest.raises(CheckpointError, match="infer"):
        WanVAEConfig.from_state_dict({k: v for k, v in sd.items() if k != "encoder.downsamples.0.residual.6.weight"})


def test_save_diffusers_layout_loads_in_diffusers(ours, tmp_path):
    out = save_wan_vae(ours, tmp_path / "vae", layout="diffusers")
    model = diffusers.AutoencoderKLWan.from_pretrained(out)
    want = vae_state_dict_to_diffusers(ours.state_dict(), ours.config)
    got = model.state_dict()
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    again = load_wan_vae(out)
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), ours.state_dict().values()))


def test_sharded_diffusers_folder(ref, ours, tmp_path):
    ref.save_pretrained(tmp_path / "vae", max_shard_size="100KB")
    assert (tmp_path / "vae" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    vae = load_wan_vae(tmp_path / "vae")
    sd = ours.state_dict()
    assert all(torch.equal(v, sd[k]) for k, v in vae.state_dict().items())
    # a shard gone: the error names it
    shard = json.loads((tmp_path / "vae" / "diffusion_pytorch_model.safetensors.index.json").read_text())
    name = max(shard["weight_map"].values())
    (tmp_path / "vae" / name).unlink()
    with pytest.raises(CheckpointError, match=name):
        load_wan_vae(tmp_path / "vae")


def test_missing_and_extra_keys_are_named(ours, tmp_path):
    sd = dict(ours.state_dict())
    missing = dict(sd)
    del missing["decoder.upsamples.2.time_conv.bias"]
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(CheckpointError, match=r"missing keys: decoder\.upsamples\.2\.time_conv\.bias"):
        load_wan_vae(tmp_path / "missing.pth", config=ours.config)

    extra = dict(sd, **{"encoder.middle.1.extra.weight": torch.zeros(3)})
    torch.save(extra, tmp_path / "extra.pth")
    with pytest.raises(CheckpointError, match=r"unexpected keys: encoder\.middle\.1\.extra\.weight"):
        load_wan_vae(tmp_path / "extra.pth", config=ours.config)

    bad = dict(sd, **{"conv2.weight": torch.zeros(4, 4, 1, 1, 2)})
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match=r"conv2\.weight \(checkpoint \(4, 4, 1, 1, 2\)"):
        load_wan_vae(tmp_path / "bad.pth", config=ours.config)

    # diffusers names the table does not know
    dif = vae_state_dict_to_diffusers(sd, ours.config)
    dif["decoder.up_blocks.0.mystery.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"decoder\.up_blocks\.0\.mystery\.weight"):
        vae_state_dict_from_diffusers(dif, ours.config)
    with pytest.raises(CheckpointError, match=r"encoder\.oops"):
        vae_state_dict_to_diffusers({"encoder.oops": torch.zeros(1)}, ours.config)


def test_missing_files_are_named(ref_dir, tmp_path):
    with pytest.raises(CheckpointError, match="Wan2.1_VAE.pth"):
        load_wan_vae(tmp_path / "Wan2.1_VAE.pth")
    (tmp_path / "vae").mkdir()
    with pytest.raises(CheckpointError, match="config.json"):
        load_wan_vae(tmp_path / "vae")
    (tmp_path / "vae" / "config.json").write_text((ref_dir / "config.json").read_text())
    with pytest.raises(CheckpointError, match="diffusion_pytorch_model.safetensors"):
        load_wan_vae(tmp_path / "vae")
