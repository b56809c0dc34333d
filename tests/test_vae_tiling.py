"""Spatially tiled VAE encode/decode (``use_tiling_vae``) against diffusers' ``AutoencoderKLWan.enable_tiling()``.

Tiny random weights, CPU float32; small tiles on a 56x72 video (latents 7x9) so that there are several tiles, overlaps
in both directions, edge tiles smaller than the stride and, in some settings, overlaps wider than the stride.
"""

import dataclasses

import pytest
import torch

from lightx2v.errors import UserError
from lightx2v.models.wan.vae import TilingConfig, WanVAE, WanVAEConfig, load_wan_vae
from tiny_reference import diffusers_vae_for_parity, rel_max

# The tiny VAE of tests/test_vae.py: every block type, non-default latent statistics.
TINY = dict(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1, attn_scales=[],
            temperal_downsample=[False, True, True], latents_mean=[0.3, -0.7, 1.1, -0.2],
            latents_std=[1.7, 0.6, 2.4, 1.2])
TOL = 1e-4

# (tile_h, tile_w, stride_h, stride_w) in pixels
SETTINGS = [
    (32, 32, 24, 24),  # 3x3 tiles; last row/column 8 / 24 px; blend 8 px = 1 latent px in encode
    (40, 32, 16, 24),  # blend (24 px) wider than the stride (16 px): blends chain through several tiles
    (64, 32, 64, 24),  # taller than the video: tiles along the width only, no overlap across the height
]


@pytest.fixture(autouse=True, scope="module")
def _one_cpu_thread():
    """The tiny model gains nothing from several threads, and on a busy machine OpenMP threads that wait for each
    other made these tests 5-10x slower; restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)




@pytest.fixture(scope="module")
def diffusers():
    return pytest.importorskip("diffusers")  # here, not at import: the GPU test below does not need diffusers


@pytest.fixture(scope="module")
def ref(diffusers):
    return diffusers_vae_for_parity(TINY)


@pytest.fixture(scope="module")
def ours(ref, tmp_path_factory):
    path = tmp_path_factory.mktemp("diffusers") / "vae"
    ref.save_pretrained(path)
    return load_wan_vae(path)


@pytest.fixture(scope="module")
def video():
    g = torch.Generator().manual_seed(1)
    return torch.rand(1, 3, 9, 56, 72, generator=g) * 2 - 1  # 9 frames -> 3 latent frames of 7x9


@pytest.fixture(scope="module")
def latents():
    g = torch.Generator().manual_seed(2)
    return torch.randn(1, 4, 3, 7, 9, generator=g)


@pytest.fixture(scope="module")
def untiled(ours, video, latents):
    """(decoded latents, encoded video) without tiling."""
    return ours.decode_raw(latents), ours.encode_raw(video)


def _diffusers_tiled(ref, t: TilingConfig):
    ref.enable_tiling(**dataclasses.asdict(t))
    return ref


def test_defaults_are_diffusers_defaults(diffusers):
    model = diffusers.AutoencoderKLWan(**TINY)
    t = TilingConfig()
    assert (t.tile_sample_min_height, t.tile_sample_min_width, t.tile_sample_stride_height,
            t.tile_sample_stride_width) == (model.tile_sample_min_height, model.tile_sample_min_width,
                                            model.tile_sample_stride_height, model.tile_sample_stride_width)
    assert t.tile == (256, 256) and t.stride == (192, 192)


@pytest.mark.parametrize("setting", SETTINGS)
def test_tiled_decode_matches_diffusers(ref, ours, latents, untiled, setting):
    t = TilingConfig(*setting)
    with torch.no_grad():
        want = _diffusers_tiled(ref, t).decode(latents).sample
    got = ours.decode_raw(latents, tiling=t)
    assert got.shape == want.shape == (1, 3, 9, 56, 72)
    err = rel_max(got, want)
    untiled = untiled[0]
    print(f"{setting}: tiled decode rel err vs diffusers {err:.3g}; tiled vs untiled: rel {rel_max(got, untiled):.3g}, "
          f"mean abs {(got - untiled).abs().mean():.3g} (mean |x| {untiled.abs().mean():.3g})")
    assert err <= TOL
    # The comparison is meaningful: tiling changes the output far beyond TOL (random weights, tiny tiles).
    assert rel_max(got, untiled) > 100 * TOL


@pytest.mark.parametrize("setting", SETTINGS)
def test_tiled_encode_matches_diffusers(ref, ours, video, untiled, setting):
    t = TilingConfig(*setting)
    with torch.no_grad():
        want = _diffusers_tiled(ref, t).encode(video).latent_dist.mode()
    got = ours.encode_raw(video, tiling=t)
    assert got.shape == want.shape == (1, 4, 3, 7, 9)
    err = rel_max(got, want)
    untiled = untiled[1]
    print(f"{setting}: tiled encode rel err vs diffusers {err:.3g}; tiled vs untiled: rel {rel_max(got, untiled):.3g}, "
          f"mean abs {(got - untiled).abs().mean():.3g} (mean |z| {untiled.abs().mean():.3g})")
    assert err <= TOL
    assert rel_max(got, untiled) > 100 * TOL


def test_batch_of_two_matches_diffusers(ref, ours, latents):
    t = TilingConfig(32, 32, 24, 24)
    z = torch.cat([latents, -latents])[:, :, :2]
    with torch.no_grad():
        want = _diffusers_tiled(ref, t).decode(z).sample
    got = ours.decode_raw(z, t)
    assert got.shape == (2, 3, 5, 56, 72)
    assert rel_max(got, want) <= TOL


def test_tiled_is_close_to_untiled(ours, video, latents, untiled):
    """Sanity: with tiles covering most of the frame, tiling changes the result only modestly, and less the larger
    the overlap. (Random weights have no spatial smoothness, so the bound is loose.)"""
    x, z = untiled
    wide = TilingConfig(48, 64, 16, 16)  # 32 px overlaps
    narrow = TilingConfig(48, 64, 40, 56)  # 8 px overlaps
    dx_wide = (ours.decode_raw(latents, wide) - x).abs().mean().item()
    dx_narrow = (ours.decode_raw(latents, narrow) - x).abs().mean().item()
    dz_wide = (ours.encode_raw(video, wide) - z).abs().mean().item()
    dz_narrow = (ours.encode_raw(video, narrow) - z).abs().mean().item()
    print(f"mean abs tiled - untiled: decode {dx_wide:.3g} (wide overlap) {dx_narrow:.3g} (narrow), mean |x| "
          f"{x.abs().mean():.3g}; encode {dz_wide:.3g} / {dz_narrow:.3g}, mean |z| {z.abs().mean():.3g}")
    assert 0 < dx_wide < 0.25 * x.abs().mean() and 0 < dz_wide < 0.25 * z.abs().mean()
    assert dx_wide < dx_narrow and dz_wide < dz_narrow


@pytest.mark.parametrize("setting", [(56, 72, 24, 24), (64, 80, 8, 8)])
def test_tiles_not_smaller_than_the_frame_give_the_untiled_result(ours, video, latents, untiled, setting):
    t = TilingConfig(*setting)
    assert torch.equal(ours.decode_raw(latents, t), untiled[0])
    assert torch.equal(ours.encode_raw(video, t), untiled[1])


def test_normalised_encode_decode_pass_tiling_on(ours, video, latents):
    t = TilingConfig(32, 32, 24, 24)
    mean = torch.tensor(ours.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(ours.config.latents_std).view(1, -1, 1, 1, 1)
    assert rel_max(ours.decode(latents[:, :, :2], t), ours.decode_raw(latents[:, :, :2] * std + mean, t)) <= TOL
    assert rel_max(ours.encode(video[:, :, :5], t), (ours.encode_raw(video[:, :, :5], t) - mean) / std) <= TOL


def test_decoder_and_encoder_only_see_tiles(ours, video, latents):
    """Memory: the networks never run on more than one tile: the largest input is one tile, one chunk."""
    seen = {"encoder": [], "decoder": []}
    handles = [getattr(ours, name).register_forward_pre_hook(lambda m, args, name=name: seen[name].append(
        tuple(args[0].shape))) for name in seen]
    try:
        ours.decode_raw(latents, TilingConfig(32, 32, 24, 24))
        ours.encode_raw(video, TilingConfig(32, 32, 24, 24))
    finally:
        for h in handles:
            h.remove()
    # decode: 3x3 tiles (rows of 4, 4, 1 latent px; columns of 4, 4, 3) x 3 latent frames, one frame per call
    assert len(seen["decoder"]) == 9 * 3
    assert max(s[3] for s in seen["decoder"]) == 4 and max(s[4] for s in seen["decoder"]) == 4
    assert {s[2] for s in seen["decoder"]} == {1}
    # encode: 3x3 tiles of <= 32 px x (1 + 2) chunks
    assert len(seen["encoder"]) == 9 * 3
    assert max(s[3] for s in seen["encoder"]) == 32 and max(s[4] for s in seen["encoder"]) == 32
    assert max(s[2] for s in seen["encoder"]) == 4


@pytest.mark.parametrize("kw,match", [
    (dict(tile_sample_stride_height=288), "stride_height"),  # stride > tile
    (dict(tile_sample_min_width=100), "min_width"),  # not a multiple of 8
    (dict(tile_sample_stride_width=12), "stride_width"),
    (dict(tile_sample_min_height=0), "min_height"),
    (dict(tile_sample_stride_height=-8), "stride_height"),
    (dict(tile_sample_min_width=256.0), "min_width"),
    (dict(tile_sample_min_height=True), "min_height"),
])
def test_bad_tile_settings_raise(kw, match):
    with pytest.raises(UserError, match=match):
        TilingConfig(**kw)


def test_tiles_must_be_whole_latent_pixels_of_the_vae():
    vae = WanVAE(WanVAEConfig(base_dim=4, z_dim=16, dim_mult=(1, 1, 1, 1, 1), num_res_blocks=1,
                              temperal_downsample=(False, False, True, True)))  # 16 px per latent px
    with pytest.raises(UserError, match="spatial factor 16"):
        vae.decode_raw(torch.zeros(1, 16, 1, 4, 4), TilingConfig(32, 32, 24, 24))
    with pytest.raises(UserError, match="spatial factor 16"):
        vae.encode_raw(torch.zeros(1, 3, 1, 64, 64), TilingConfig(32, 32, 24, 24))


# --- GPU memory (marked `gpu`, skipped without CUDA) -----------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_tiled_decode_720p_81_frames_fits_in_4_gib():
    """Full-size Wan2.1 VAE (random weights), bf16: decoding 81 frames at 720x1280 with the default tiles peaks at
    <= 4 GiB of allocated GPU memory (weights, latents and the 0.45 GiB output included). Measured on an H100:
    1.50 GiB allocated, 1.80 GiB reserved, 8.9 s (untiled: 10.4 GiB, 4.4 s)."""
    dev = torch.device("cuda")
    with torch.device(dev):
        vae = WanVAE(WanVAEConfig()).to(torch.bfloat16).eval()
    z = torch.randn(1, 16, 21, 90, 160, device=dev, dtype=torch.bfloat16)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    x = vae.decode(z, TilingConfig())
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    print(f"peak allocated {peak / 2**30:.2f} GiB, reserved {torch.cuda.max_memory_reserved() / 2**30:.2f} GiB")
    assert x.shape == (1, 3, 81, 720, 1280) and x.dtype == torch.bfloat16
    assert peak <= 4 * 2**30
