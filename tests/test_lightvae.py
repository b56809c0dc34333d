"""LightVAE (use_lightvae): a pruned-width Wan VAE read from a checkpoint's shapes, loaded strictly, decoding (and
encoding) as diffusers' AutoencoderKLWan of the same widths does."""

import pytest
import torch
from safetensors.torch import save_file

from lightx2v.errors import CheckpointError
from lightx2v.models.wan.lightvae import LIGHTVAE_CONFIG, LIGHTVAE_FILE, load_lightvae, pruning_rate
from lightx2v.models.wan.vae import WanVAEConfig, vae_state_dict_from_diffusers
from tiny_reference import diffusers_vae_for_parity, rel_max

diffusers = pytest.importorskip("diffusers")
TOL = 1e-4


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    """lightvaew2_1's architecture (every Wan2.1 VAE width x 0.25: base_dim 24) as diffusers builds it, with random
    weights, saved in the Wan layout (original names) as .safetensors and .pth."""
    ref = diffusers_vae_for_parity(dict(base_dim=24, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                                        temperal_downsample=[False, True, True]))
    sd = vae_state_dict_from_diffusers(ref.state_dict(), LIGHTVAE_CONFIG)
    folder = tmp_path_factory.mktemp("lightvae")
    save_file({k: v.contiguous() for k, v in sd.items()}, folder / LIGHTVAE_FILE)
    torch.save(sd, folder / "lightvaew2_1.pth")
    return ref, folder, sd


def test_widths_from_shapes_and_strict_load(pruned):
    _, folder, sd = pruned
    for source in (folder / LIGHTVAE_FILE, folder / "lightvaew2_1.pth", folder):
        vae = load_lightvae(source)
        assert vae.config == LIGHTVAE_CONFIG and vae.config.base_dim == 24 and vae.config.decoder_base_dim == 24
        assert pruning_rate(vae.config) == 0.75
        got = vae.state_dict()
        assert got.keys() == sd.keys() and all(torch.equal(got[k], sd[k]) for k in sd)
    # the full VAE has 4x the channels: the shapes really are pruned
    assert vae.decoder.conv1.weight.shape == (96, 16, 3, 3, 3) and vae.encoder.conv1.weight.shape == (24, 3, 3, 3, 3)


def test_decodes_and_encodes_like_diffusers(pruned):
    ref, folder, _ = pruned
    vae = load_lightvae(folder / LIGHTVAE_FILE)
    z = torch.randn(1, 16, 2, 4, 4, generator=torch.Generator().manual_seed(0))  # raw latents
    with torch.no_grad():
        want = ref.decode(z).sample.clamp(-1, 1)
    got = vae.decode_raw(z)
    assert got.shape == (1, 3, 5, 32, 32) and rel_max(got, want) < TOL
    cfg = vae.config  # the normalised entry point the decode stage calls gives the same video
    mean = torch.tensor(cfg.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(cfg.latents_std).view(1, -1, 1, 1, 1)
    assert rel_max(vae.decode((z - mean) / std), want) < TOL
    assert rel_max(vae.decode_raw(z * 1.5), want) > 0.05  # the test can fail

    video = torch.rand(1, 3, 5, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        mu = ref.encode(video).latent_dist.mode()
    assert rel_max(vae.encode_raw(video), mu) < TOL


def test_bf16(pruned):
    _, folder, _ = pruned
    vae = load_lightvae(folder / LIGHTVAE_FILE, dtype=torch.bfloat16)
    assert vae.dtype == torch.bfloat16
    assert vae.decode(torch.zeros(1, 16, 2, 4, 4)).dtype == torch.bfloat16


def test_wrong_files_name_expected_and_found_keys(pruned, tmp_path):
    _, _, sd = pruned
    save_file({"encode.cnn0.weight": torch.zeros(16, 3, 3, 3)}, tmp_path / "flownet.safetensors")
    with pytest.raises(CheckpointError) as e:
        load_lightvae(tmp_path / "flownet.safetensors")
    msg = str(e.value)
    assert "is not a Wan VAE" in msg and "against lightvaew2_1's layout (base_dim 24)" in msg
    assert "missing keys (" in msg and "conv1.bias" in msg and "unexpected keys (1): encode.cnn0.weight" in msg

    broken = dict(sd)
    del broken["decoder.upsamples.4.residual.3.gamma"]
    broken["decoder.head.2.bias"] = torch.zeros(4)
    broken["decoder.extra.weight"] = torch.zeros(1)
    torch.save(broken, tmp_path / "broken.pth")
    with pytest.raises(CheckpointError) as e:
        load_lightvae(tmp_path / "broken.pth")
    msg = str(e.value)
    assert "base_dim 24" in msg and "missing keys (1): decoder.upsamples.4.residual.3.gamma" in msg
    assert "unexpected keys (1): decoder.extra.weight" in msg
    assert "decoder.head.2.bias (file (4,), model (3,))" in msg

    with pytest.raises(CheckpointError, match="missing LightVAE checkpoint"):
        load_lightvae(tmp_path)  # a folder without lightvaew2_1.safetensors


def test_full_width_checkpoint_is_a_lightvae_of_rate_zero():
    assert pruning_rate(WanVAEConfig()) == 0.0 and pruning_rate(WanVAEConfig.wan22()) == 0.0
