"""The decode stage's one interface over the full VAE, the LightVAE and the TAE, LightX2V's file lookup, and the
example configs of configs/lightvae and configs/video_frame_interpolation."""

from pathlib import Path

import pytest
import torch

from lightx2v.errors import UserError
from lightx2v.models.wan.autoencoders import (LatentAutoencoder, default_tae_file, find_weight_file,
                                              load_latent_autoencoder)
from lightx2v.models.wan.tae import TAE22_FILE, TAE_FILE, TAEConfig, TinyAutoencoder, save_tae
from lightx2v.models.wan.vae import WanVAE, WanVAEConfig, save_wan_vae


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("ae")
    torch.manual_seed(0)
    small = dict(dim_mult=(1, 2, 2, 2), num_res_blocks=1)
    save_wan_vae(WanVAE(WanVAEConfig(base_dim=16, **small)), root / "Wan2.1_VAE.pth")
    save_wan_vae(WanVAE(WanVAEConfig(base_dim=8, **small)), root / "lightvae.pth")  # half the widths
    save_tae(TinyAutoencoder(TAEConfig()), root / TAE_FILE)
    return {"vae": root / "Wan2.1_VAE.pth", "lightvae": root / "lightvae.pth", "tae": root / TAE_FILE}


def test_one_call_for_all_three(files):
    z = torch.randn(1, 16, 2, 4, 6)
    video = torch.rand(1, 3, 5, 32, 48) * 2 - 1
    for kind, path in files.items():
        ae = load_latent_autoencoder(kind, path, z_dim=16)
        assert isinstance(ae, LatentAutoencoder)
        assert (ae.config.z_dim, ae.config.spatial_factor, ae.config.temporal_factor) == (16, 8, 4)
        out = ae.decode(z.to(ae.dtype), tiling=None)
        assert out.shape == (1, 3, 5, 32, 48) and out.dtype == ae.dtype, kind
        assert out.min() >= -1 and out.max() <= 1
        assert ae.encode(video, tiling=None).shape == (1, 16, 2, 4, 6), kind


def test_latent_channel_mismatch_and_kind(files):
    with pytest.raises(UserError, match=r"TAE for 48-channel latents \(taew2_2.pth\)"):
        load_latent_autoencoder("tae", files["tae"], z_dim=48)
    with pytest.raises(UserError, match="not one of vae, lightvae, tae"):
        load_latent_autoencoder("tiny", files["tae"])
    assert default_tae_file(48) == TAE22_FILE and default_tae_file(16) == TAE_FILE


def test_find_weight_file_follows_lightx2v_order(tmp_path):
    (tmp_path / "original").mkdir()
    (tmp_path / "fp8").mkdir()
    for p in (tmp_path / TAE_FILE, tmp_path / "original" / TAE_FILE):
        p.write_bytes(b"")
    assert find_weight_file(tmp_path, None, TAE_FILE, "tae_path") == tmp_path / "original" / TAE_FILE
    (tmp_path / "fp8" / TAE_FILE).write_bytes(b"")
    assert find_weight_file(tmp_path, None, TAE_FILE, "tae_path") == tmp_path / "fp8" / TAE_FILE
    assert find_weight_file(tmp_path, "/x/lighttaew2_1.safetensors", TAE_FILE, "tae_path").name.startswith("light")
    with pytest.raises(UserError, match="tae_path is not set and taew2_2.pth is in none of"):
        find_weight_file(tmp_path, None, TAE22_FILE, "tae_path")


# --- the example configs ----------------------------------------------------------------------------------------------

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
EXAMPLES = [*CONFIGS.glob("lightvae/*.json"), *CONFIGS.glob("video_frame_interpolation/*.json")]


@pytest.mark.parametrize("name", sorted(p.relative_to(CONFIGS).as_posix() for p in EXAMPLES))
def test_example_configs(name):
    from lightx2v.config import build_config, load_config_json
    from lightx2v.models.wan.family import WAN

    raw = load_config_json(CONFIGS / name)
    cfg = build_config({}, raw, {}, family=WAN)
    if "video_frame_interpolation" in raw:
        cfg.vfi.check_fps(cfg.sampling.fps)
        assert cfg.vfi.target_fps == raw["video_frame_interpolation"]["target_fps"]
    wan = cfg.family
    assert wan.use_tae == raw.get("use_tae", False) and wan.use_lightvae == raw.get("use_lightvae", False)
    if wan.use_lightvae:
        assert wan.vae_path.endswith(".safetensors")
    if wan.use_tae:
        fname = Path(wan.tae_path).name
        assert raw.get("need_scaled", False) == ("lighttae" in fname), name  # what enable_lightvae would infer
        assert (fname == "taew2_2.pth") == (raw.get("vae_stride") == [4, 16, 16]), name


@pytest.mark.parametrize("option", ["tae", "lightvae", "rife"])
def test_the_pipeline_with_each_option_writes_a_video_at_the_requested_rate(files, tmp_path, option):
    import av

    from lightx2v import LightX2VPipeline
    from lightx2v.io.video import read_video
    from lightx2v.models.rife import IFNet, save_rife

    kw = {"tae": dict(use_tae=True, tae_path=str(files["tae"])),
          "lightvae": dict(use_lightvae=True, vae_path=str(files["lightvae"])),
          "rife": dict(video_frame_interpolation={"algo": "rife", "target_fps": 32,
                                                  "model_path": str(save_rife(IFNet().eval(), tmp_path / "flownet.pkl"))})}
    pipe = LightX2VPipeline().create_generator(height=32, width=48, num_frames=5, infer_steps=2, **kw[option])
    out = pipe.generate(prompt="a cat", save_result_path=tmp_path / "o.mp4", progress=False).path
    with av.open(str(out)) as c:
        rate = c.streams.video[0].average_rate
    frames = read_video(out)
    assert rate == (32 if option == "rife" else 16)
    assert frames.shape == ((9 if option == "rife" else 5), 32, 48, 3)
    plain = LightX2VPipeline().create_generator(height=32, width=48, num_frames=5, infer_steps=2)
    if option != "rife":  # another decoder: another video from the same latents
        a = plain.generate(prompt="a cat", return_result_tensor=True, progress=False)["video"]
        b = pipe.generate(prompt="a cat", return_result_tensor=True, progress=False)["video"]
        assert (a - b).abs().max() > 1e-2
    with pytest.raises(UserError, match="target_fps"):
        LightX2VPipeline().create_generator(height=32, width=48, num_frames=5, fps=40, **kw["rife"])


def test_tae_decode_then_rife_then_mp4_at_the_target_rate(files, tmp_path):
    """The decode side end to end as the decode stage will chain it: TAE decode -> frames [F, H, W, 3] in [0, 1]
    -> RIFE to target_fps -> an MP4 that plays at target_fps with 2F - 1 frames."""
    import av

    from lightx2v.io.video import read_video, save_video
    from lightx2v.models.rife import IFNet, interpolate

    tae = load_latent_autoencoder("tae", files["tae"], z_dim=16)
    video = tae.decode(torch.randn(1, 16, 2, 4, 6))  # [1, 3, 5, 32, 48] in [-1, 1]
    frames = (video[0].float() / 2 + 0.5).clamp(0, 1).permute(1, 2, 3, 0)  # what DecodeStage hands on
    out, fps = interpolate(frames, 16, 32, IFNet().eval())
    path = save_video(out, tmp_path / "out.mp4", fps)
    with av.open(str(path)) as c:
        stream = c.streams.video[0]
        assert stream.average_rate == 32 and (stream.width, stream.height) == (48, 32)
    back = read_video(path)
    assert back.shape == (9, 32, 48, 3)
    assert (back[0::2] - frames).abs().mean() < 0.03  # the originals survive H.264 at CRF 18


def test_decoder_half_alone(files):
    """The decode stage loads only the decoder half (the file still checked whole); the video is the same."""
    z = torch.randn(1, 16, 2, 4, 6)
    for kind, path in files.items():
        whole = load_latent_autoencoder(kind, path)
        half = load_latent_autoencoder(kind, path, part="decoder")
        assert half.encoder is None and all(k.startswith(("decoder.", "conv2.")) for k in half.state_dict()), kind
        assert torch.equal(half.decode(z), whole.decode(z)), kind
    tae = load_latent_autoencoder("tae", files["tae"], part="decoder")
    with pytest.raises(UserError, match="part='decoder': it has no encoder"):
        tae.encode(torch.zeros(1, 3, 5, 32, 48))
    enc = load_latent_autoencoder("tae", files["tae"], part="encoder")
    assert enc.decoder is None and enc.encode(torch.zeros(1, 3, 5, 32, 48)).shape == (1, 16, 2, 4, 6)
