"""The tiny autoencoder (TAEHV, taew2_1 / taew2_2): strict loading of release-format files, and decode / encode
against a frame-by-frame reference written here from the file's tensors (plain F.conv2d, the causal graph walked one
frame at a time), which our chunked, all-frames-at-once passes must equal."""

import pytest
import torch
import torch.nn.functional as F

from lightx2v.errors import CheckpointError, UserError
from lightx2v.models.wan.tae import TAE_FILE, TAEConfig, TinyAutoencoder, load_tae, save_tae
from lightx2v.models.wan.vae import WAN21_LATENTS_MEAN, WAN21_LATENTS_STD, WAN22_LATENTS_MEAN, WAN22_LATENTS_STD

TOL = 1e-5

# The release's layer sequences: (kind, argument) by index (the parameter names are ``{side}.{index}.*``).
_MEM3 = [("mem", None)] * 3
ENCODER = [("conv", 1), ("relu", None), ("pool", 2), ("conv", 2), *_MEM3, ("pool", 2), ("conv", 2), *_MEM3,
           ("pool", 1), ("conv", 2), *_MEM3, ("conv", 1)]
DECODER = [("clamp", None), ("conv", 1), ("relu", None), *_MEM3, ("up", None), ("grow", 1), ("conv", 1), *_MEM3,
           ("up", None), ("grow", 2), ("conv", 1), *_MEM3, ("up", None), ("grow", 2), ("conv", 1), ("relu", None),
           ("conv", 1)]


def reference_run(spec, sd, side, frames):
    """Walk the causal graph one frame at a time (each TGrow's frames in order, each TPool waiting for its run of
    frames), every layer written out with the tensors of ``sd``: frames [N, C, H, W] each -> output frames."""
    memory, pools, out = {}, {}, []

    def conv(x, i, stride):
        w, b = sd[f"{side}.{i}.weight"], sd.get(f"{side}.{i}.bias")
        return F.conv2d(x, w, b, stride=stride, padding=1)

    def memblock(x, i):
        past = memory.get(i, torch.zeros_like(x))
        memory[i] = x
        p = f"{side}.{i}.conv."
        h = torch.cat([x, past], dim=1)
        h = F.relu(F.conv2d(h, sd[p + "0.weight"], sd[p + "0.bias"], padding=1))
        h = F.relu(F.conv2d(h, sd[p + "2.weight"], sd[p + "2.bias"], padding=1))
        h = F.conv2d(h, sd[p + "4.weight"], sd[p + "4.bias"], padding=1)
        return F.relu(h + x)  # widths are equal in these files: identity skip

    def walk(i, x):
        while i < len(spec):
            kind, arg = spec[i]
            if kind == "conv":
                x = conv(x, i, arg)
            elif kind == "relu":
                x = F.relu(x)
            elif kind == "clamp":
                x = torch.tanh(x / 3) * 3
            elif kind == "up":
                x = F.interpolate(x, scale_factor=2, mode="nearest")
            elif kind == "mem":
                x = memblock(x, i)
            elif kind == "grow":
                y = F.conv2d(x, sd[f"{side}.{i}.conv.weight"])
                for part in y.chunk(arg, dim=1):  # output frames in time order
                    walk(i + 1, part)
                return
            elif kind == "pool":
                buf = pools.setdefault(i, [])
                buf.append(x)
                if len(buf) < arg:
                    return
                x = F.conv2d(torch.cat(buf, dim=1), sd[f"{side}.{i}.conv.weight"])
                pools[i] = []
            i += 1
        out.append(x)

    for x in frames:
        walk(0, x)
    return out


def reference_decode(sd, z, patch=1, mean=None, std=None):
    """normalised z [1, c, T, h, w] -> video [1, 3, 4T - 3, H, W] in [-1, 1]; mean/std: the file works on raw
    latents (need_scaled)."""
    if mean is not None:
        z = z * torch.tensor(std).view(1, -1, 1, 1, 1) + torch.tensor(mean).view(1, -1, 1, 1, 1)
    frames = reference_run(DECODER, sd, "decoder", list(z.unbind(2)))[3:]  # the first 3 precede frame 0
    frames = [F.pixel_shuffle(f.clamp(0, 1), patch) for f in frames]
    return torch.stack(frames, dim=2) * 2 - 1


def reference_encode(sd, video, patch=1, mean=None, std=None):
    """video [1, 3, F, H, W] in [-1, 1] -> latents [1, c, ceil(F/4), h, w] (normalised when mean/std are given)."""
    frames = [F.pixel_unshuffle((f + 1) / 2, patch) for f in video.unbind(2)]
    frames += [frames[-1]] * (-len(frames) % 4)
    z = torch.stack(reference_run(ENCODER, sd, "encoder", frames), dim=2)
    if mean is not None:
        z = (z - torch.tensor(mean).view(1, -1, 1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1, 1)
    return z


def _random_tae(cfg: TAEConfig, seed: int) -> TinyAutoencoder:
    torch.manual_seed(seed)
    model = TinyAutoencoder(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.mul_(1.6 if name.startswith("decoder") else 1.3)  # keep activations alive through the depth
            if name.endswith("bias"):
                p.add_(0.05)
    return model


@pytest.fixture(scope="module")
def wan21(tmp_path_factory):
    model = _random_tae(TAEConfig(), 0)
    path = save_tae(model, tmp_path_factory.mktemp("tae") / TAE_FILE)
    return model, path


@pytest.fixture(scope="module")
def latents():
    return torch.randn(1, 16, 3, 4, 6, generator=torch.Generator().manual_seed(1)) * 1.5


def test_loads_strictly_and_decodes_like_the_frame_by_frame_reference(wan21, latents):
    model, path = wan21
    loaded = load_tae(path)  # taew2_1.pth: normalised latents
    assert loaded.config == TAEConfig() and not loaded.config.need_scaled
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    assert load_tae(path.parent).config == TAEConfig()  # a folder holding taew2_1.pth

    sd = torch.load(path, weights_only=True)
    want = reference_decode(sd, latents)
    assert want.shape == (1, 3, 9, 32, 48)
    assert want.std() > 0.2 and (want.abs() < 1).float().mean() > 0.5  # a real signal, mostly unclamped
    for chunk in (1, 2, None):
        video = loaded.decode(latents, time_chunk=chunk)
        assert video.shape == want.shape and video.dtype == torch.float32
        assert (video - want).abs().max().item() < TOL, chunk
    # the test can fail: other latents give another video
    assert (loaded.decode(latents.roll(1, dims=2)) - want).abs().max() > 0.1


def test_encode_like_the_frame_by_frame_reference(wan21):
    model, path = wan21
    sd = torch.load(path, weights_only=True)
    video = torch.rand(1, 3, 9, 32, 48, generator=torch.Generator().manual_seed(2)) * 2 - 1
    want = reference_encode(sd, video)
    assert want.shape == (1, 16, 3, 4, 6)
    for chunk in (1, None):
        z = model.encode(video, time_chunk=chunk)
        assert z.shape == want.shape and (z - want).abs().max().item() < TOL
    assert model.encode(video[:, :, :5]).shape == (1, 16, 2, 4, 6)  # 1 + 4k frames -> k + 1 latent frames


def test_wan22_lighttae_safetensors_scales_latents(tmp_path):
    """Wan2.2's 48 channels with 2x2 patches; a "lighttae" file works on raw latents (need_scaled)."""
    model = _random_tae(TAEConfig.wan22(), 3)
    path = save_tae(model, tmp_path / "lighttaew2_2.safetensors")
    loaded = load_tae(path)
    assert loaded.config == TAEConfig.wan22(need_scaled=True)
    assert loaded.config.spatial_factor == 16
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    z = torch.randn(1, 48, 2, 2, 3, generator=torch.Generator().manual_seed(4))
    want = reference_decode(sd, z, patch=2, mean=WAN22_LATENTS_MEAN, std=WAN22_LATENTS_STD)
    video = loaded.decode(z)
    assert video.shape == (1, 3, 5, 32, 48) and (video - want).abs().max().item() < TOL
    unscaled = load_tae(path, need_scaled=False)  # an explicit value wins over the name
    assert not unscaled.config.need_scaled and (unscaled.decode(z) - want).abs().max() > 0.05
    clip = torch.rand(1, 3, 5, 32, 48, generator=torch.Generator().manual_seed(5)) * 2 - 1
    want = reference_encode(sd, clip, patch=2, mean=WAN22_LATENTS_MEAN, std=WAN22_LATENTS_STD)
    assert (loaded.encode(clip) - want).abs().max().item() < TOL


def test_need_scaled_wan21_uses_wan21_statistics(wan21, latents, tmp_path):
    model, path = wan21
    light = save_tae(model, tmp_path / "lighttaew2_1.pth")
    want = reference_decode(model.state_dict(), latents, mean=WAN21_LATENTS_MEAN, std=WAN21_LATENTS_STD)
    assert (load_tae(light).decode(latents) - want).abs().max().item() < TOL


def test_bf16_decode(wan21, latents):
    ref = load_tae(wan21[1]).decode(latents)
    out = load_tae(wan21[1], dtype=torch.bfloat16).decode(latents)
    assert out.dtype == torch.bfloat16 and (out.float() - ref).abs().mean().item() < 0.02


def test_time_upscaling_tgrow_rows_are_trimmed(wan21, tmp_path, latents):
    """A file whose first TGrow has twice the rows (trained with one more temporal upsampling): the last rows are
    the ones a stride-1 TGrow uses, as the reference loader keeps them."""
    model, path = wan21
    sd = torch.load(path, weights_only=True)
    grow = sd["decoder.7.conv.weight"]  # [256, 256, 1, 1]
    sd["decoder.7.conv.weight"] = torch.cat([torch.randn_like(grow), grow])
    torch.save(sd, tmp_path / "wide.pth")
    assert torch.equal(load_tae(tmp_path / "wide.pth").decode(latents), load_tae(path).decode(latents))


def test_wrong_files_name_expected_and_found_keys(wan21, tmp_path):
    _, path = wan21
    torch.save({"module.block0.conv0.0.0.weight": torch.zeros(96, 15, 3, 3)}, tmp_path / "flownet.pth")
    with pytest.raises(CheckpointError) as e:
        load_tae(tmp_path / "flownet.pth")
    msg = str(e.value)
    assert "not a TAEHV" in msg and "missing keys (" in msg and "decoder.1.weight" in msg
    assert "unexpected keys (1): module.block0.conv0.0.0.weight" in msg

    sd = torch.load(path, weights_only=True)
    del sd["decoder.15.conv.2.bias"]
    sd["encoder.4.conv.0.weight"] = torch.zeros(64, 64, 3, 3)
    sd["decoder.99.weight"] = torch.zeros(1)
    torch.save(sd, tmp_path / "broken.pth")
    with pytest.raises(CheckpointError) as e:
        load_tae(tmp_path / "broken.pth")
    msg = str(e.value)
    assert "missing keys (1): decoder.15.conv.2.bias" in msg and "unexpected keys (1): decoder.99.weight" in msg
    assert "encoder.4.conv.0.weight (file (64, 64, 3, 3), model (64, 128, 3, 3))" in msg

    with pytest.raises(CheckpointError, match="missing TAE checkpoint"):
        load_tae(tmp_path / "taew2_1_missing.pth")
    with pytest.raises(UserError, match="holding neither"):
        load_tae(tmp_path)  # a folder without taew2_1.pth or taew2_2.pth
    model = load_tae(path)
    with pytest.raises(UserError, match=r"latents must be \[B, 16"):
        model.decode(torch.zeros(1, 48, 2, 4, 4))
    with pytest.raises(UserError, match="divisible by 8"):
        model.encode(torch.zeros(1, 3, 5, 30, 32))
