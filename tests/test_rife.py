"""RIFE frame interpolation: loading a release-format flownet.pkl, frame positions, warping against a plain-torch
reference, time-step blending through a network whose output is known in closed form, batching."""

import math

import pytest
import torch
import torch.nn.functional as F

from lightx2v.errors import CheckpointError, UserError
from lightx2v.models.rife import (IFNet, IFNetConfig, VFIConfig, frame_positions, interpolate, load_rife, save_rife,
                                  warp)
from lightx2v.models.rife.checkpoint import DDP_PREFIX, RIFE_FILE

FPS = 16
# Warps sample through grid_sample's normalised float32 coordinates (as the original does): on the 128-pixel canvas
# the tests pad to, a sampling position is off by up to ~128 * 1.2e-7 / 2 pixels, so values near an edge between
# very different pixels move by up to ~1.5e-5. Tests that warp on that canvas allow this much.
CANVAS_TOL = 3e-5


def _random_ifnet(seed: int = 0, config: IFNetConfig | None = None) -> IFNet:
    torch.manual_seed(seed)
    net = IFNet(config).eval()
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("beta"):
                p.uniform_(0.5, 1.5)  # the release's gains are not all 1
    return net


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """A random-weight RIFE v4.26 IFNet saved as the release's flownet.pkl: ``module.``-prefixed keys, plus
    training-only teacher/caltime tensors as the real file has."""
    net = _random_ifnet()
    extra = {"teacher.conv0.0.0.weight": torch.randn(32, 31, 3, 3), "teacher.convblock.0.beta": torch.ones(1, 64, 1, 1),
             "caltime.0.weight": torch.randn(8, 25, 3, 3), "caltime.8.bias": torch.zeros(1)}
    folder = tmp_path_factory.mktemp("train_log")
    path = save_rife(net, folder, extra=extra)
    return net, path


def _frames(n, h, w, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, h, w, 3, generator=g)


# --- loading --------------------------------------------------------------------------------------------------------


def test_release_file_loads_strictly(release):
    net, path = release
    raw = torch.load(path, weights_only=True)
    assert path.name == RIFE_FILE and all(k.startswith(DDP_PREFIX) for k in raw)
    assert any(k.startswith("module.teacher.") for k in raw) and any(k.startswith("module.caltime.") for k in raw)
    for source in (path, path.parent):  # the file, or the train_log folder holding it
        loaded = load_rife(source)
        assert loaded.config == IFNetConfig()  # v4.26's widths, read from the tensors
        want = net.state_dict()
        got = loaded.state_dict()
        assert got.keys() == want.keys() and len(got) == 158
        assert all(torch.equal(got[k], want[k]) for k in want)
    # a file saved without the DDP prefix (e.g. re-saved from a bare IFNet) loads too
    bare = path.parent / "bare.pkl"
    torch.save(net.state_dict(), bare)
    assert torch.equal(load_rife(bare).block3.convblock[5].beta, net.block3.convblock[5].beta)


def test_loaded_dtype_and_widths(tmp_path):
    small = IFNetConfig(block_channels=(16, 12, 8), feature_channels=2, head_channels=6)
    path = save_rife(_random_ifnet(3, small), tmp_path / "flownet.pkl")
    loaded = load_rife(path, dtype=torch.bfloat16)
    assert loaded.config == small and loaded.dtype == torch.bfloat16 and len(loaded.blocks) == 3


def test_wrong_files_name_expected_and_found_keys(release, tmp_path):
    net, path = release
    sd = torch.load(path, weights_only=True)

    # not a flownet at all: every expected key missing, the file's keys listed
    other = tmp_path / "vae.pth"
    torch.save({"encoder.conv1.weight": torch.zeros(96, 3, 3, 3, 3), "decoder.head.0.gamma": torch.ones(96, 1, 1, 1)},
               other)
    with pytest.raises(CheckpointError) as e:
        load_rife(other)
    msg = str(e.value)
    assert "missing keys (158): block0.conv0.0.0.bias" in msg and "(146 more)" in msg
    assert "unexpected keys (2): decoder.head.0.gamma, encoder.conv1.weight" in msg and str(other) in msg

    # one tensor absent, one of the wrong shape, one unknown
    broken = dict(sd)
    del broken["module.block2.convblock.3.beta"]
    broken["module.block1.lastconv.0.weight"] = torch.zeros(128, 48, 4, 4)
    broken["module.refine.weight"] = torch.zeros(1)
    bad = tmp_path / "broken.pkl"
    torch.save(broken, bad)
    with pytest.raises(CheckpointError) as e:
        load_rife(bad)
    msg = str(e.value)
    assert "missing keys (1): block2.convblock.3.beta" in msg
    assert "unexpected keys (1): refine.weight" in msg
    assert "block1.lastconv.0.weight (file (128, 48, 4, 4), model (128, 52, 4, 4))" in msg

    # half the keys prefixed: not a release file
    mixed = {(k if i % 2 else k.removeprefix(DDP_PREFIX)): v for i, (k, v) in enumerate(sd.items())}
    torch.save(mixed, tmp_path / "mixed.pkl")
    with pytest.raises(CheckpointError, match="carry the 'module.' prefix"):
        load_rife(tmp_path / "mixed.pkl")

    with pytest.raises(CheckpointError, match="missing RIFE model"):
        load_rife(tmp_path / "nowhere")


# --- warping --------------------------------------------------------------------------------------------------------


def reference_warp(x: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """Bilinear backward warp written out: sample x at (x + dx, y + dy) in pixels, positions clamped to the frame
    (grid_sample's border padding with align_corners=True), in float64."""
    b, c, h, w = x.shape
    x, flow = x.double(), flow.double()
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    sx = (xs + flow[:, 0]).clamp(0, w - 1)  # [B, H, W]
    sy = (ys + flow[:, 1]).clamp(0, h - 1)
    x0, y0 = sx.floor().long(), sy.floor().long()
    x1, y1 = (x0 + 1).clamp(max=w - 1), (y0 + 1).clamp(max=h - 1)
    ax, ay = (sx - x0).unsqueeze(1), (sy - y0).unsqueeze(1)

    def at(yi, xi):  # x[b, :, yi[b], xi[b]] -> [B, C, H, W]
        idx = (yi * w + xi).view(b, 1, h * w).expand(b, c, h * w)
        return x.view(b, c, h * w).gather(2, idx).view(b, c, h, w)

    return ((1 - ay) * ((1 - ax) * at(y0, x0) + ax * at(y0, x1)) + ay * ((1 - ax) * at(y1, x0) + ax * at(y1, x1)))


def test_warp_matches_plain_torch_reference():
    g = torch.Generator().manual_seed(5)
    x = torch.rand(2, 5, 17, 23, generator=g)
    flow = torch.randn(2, 2, 17, 23, generator=g) * 6  # several pixels, often outside the frame
    got = warp(x, flow)
    want = reference_warp(x, flow)
    assert got.dtype == torch.float32
    assert (got.double() - want).abs().max().item() < 1e-5
    # the test can fail: a half-pixel shift of the flow is far off
    assert (warp(x, flow + 0.5).double() - want).abs().max().item() > 0.1
    # zero flow is the identity, to rounding
    assert (warp(x, torch.zeros_like(flow)) - x).abs().max().item() < 1e-5


# --- positions ------------------------------------------------------------------------------------------------------


def test_frame_positions():
    pos = frame_positions(5, 16, 32)  # 5 frames -> 9: 2n - 1
    assert [(p.i0, p.i1, p.t) for p in pos] == [(k // 2, k // 2 + k % 2, 0.5 * (k % 2)) for k in range(9)]
    pos = frame_positions(7, 16, 24)  # 6 intervals of 1/16 s = 0.375 s = 9 intervals of 1/24 s -> 10 frames
    assert [(p.i0, p.i1) for p in pos] == [(0, 0), (0, 1), (1, 2), (2, 2), (2, 3), (3, 4), (4, 4), (4, 5), (5, 6),
                                           (6, 6)]
    assert [p.t for p in pos] == pytest.approx([0, 2 / 3, 1 / 3, 0, 2 / 3, 1 / 3, 0, 2 / 3, 1 / 3, 0])
    assert len(frame_positions(81, 16, 25)) == math.floor(80 * 25 / 16) + 1 == 126
    # exact positions: output frame 276 of 25 -> 60 fps is source frame 115 (float arithmetic says 114 + 0.99999...)
    assert frame_positions(121, 25, 60)[276] == frame_positions(121, 25, 60)[276].__class__(115, 115, 0.0)
    assert len(frame_positions(1, 16, 32)) == 1 and len(frame_positions(81, 16, 16)) == 81


# --- a network whose output is known ----------------------------------------------------------------------------------


def constructed_ifnet(a: float, b: float, flow0=(0.0, 0.0), flow1=(0.0, 0.0)) -> IFNet:
    """An IFNet whose output is warp(I0, flow0) * s + warp(I1, flow1) * (1 - s) with s = sigmoid(a * t + b):

    * block 0 (scale 16) outputs the constant flows through its last bias alone (x 16 for the scale); every other
      weight of blocks 0-3 is zero, so they add no flow;
    * block 4 carries t from its input channel 14 (after I0', I1', F0', F1') through the centre taps of its two
      strided convs and the residual convs (zero weights: identity on t >= 0) to the mask logit: its transposed conv
      reads each input pixel with exactly one tap per output pixel (taps 1 and 2 of 4), times a, plus the bias b.
    """
    net = IFNet().eval()
    with torch.no_grad():
        for p in net.parameters():
            p.zero_()
        for blk in net.blocks:
            for rc in blk.convblock:
                rc.beta.fill_(1.0)
        bias = net.block0.lastconv[0].bias  # 52 channels -> pixel shuffle -> 13: channel c takes 4c .. 4c + 3
        scale0 = net.config.block_scales()[0]
        for c, v in enumerate((*flow0, *flow1)):
            bias[4 * c : 4 * c + 4] = v / scale0
        last = net.block4
        t_channel = 2 * 3 + 2 * net.config.feature_channels  # 14
        last.conv0[0][0].weight[0, t_channel, 1, 1] = 1.0
        last.conv0[1][0].weight[0, 0, 1, 1] = 1.0
        mask = 4  # flow 0..3, mask 4
        last.lastconv[0].weight[0, 4 * mask : 4 * mask + 4, 1:3, 1:3] = a
        last.lastconv[0].bias[4 * mask : 4 * mask + 4] = b
    return net


def test_constructed_network_is_exact_at_t0_and_t1():
    net = constructed_ifnet(-40.0, 20.0)  # sigmoid(20) == 1.0 in float32
    g = torch.Generator().manual_seed(2)
    i0, i1 = torch.rand(1, 3, 128, 128, generator=g), torch.rand(1, 3, 128, 128, generator=g)
    with torch.no_grad():
        assert (net(i0, i1, 0.0) - i0).abs().max().item() < CANVAS_TOL
        assert (net(i0, i1, 1.0) - i1).abs().max().item() < CANVAS_TOL
        assert (net(i0, i1, 0.5) - (i0 + i1) / 2).abs().max().item() < CANVAS_TOL
        assert (net(i0, i1, 0.45) - i0).abs().max().item() > 0.05  # t really moves the output (logit 2)


def test_double_rate_keeps_originals_at_even_positions():
    net = constructed_ifnet(-40.0, 20.0)
    frames = _frames(5, 40, 56)
    out, fps = interpolate(frames, FPS, 2 * FPS, net)
    assert fps == 32 and out.shape == (9, 40, 56, 3) and out.dtype == torch.float32
    assert torch.equal(out[0::2], frames)  # the originals, bit for bit
    mid = (frames[:-1] + frames[1:]) / 2  # t = 0.5: the network's output is the mean of its neighbours
    assert (out[1::2] - mid).abs().max().item() < CANVAS_TOL


def test_time_steps_flows_and_blend_through_the_network():
    """16 -> 24 fps: each output frame is the blend of the right pair at the right t, with both flows applied."""
    a, b, flow0, flow1 = -4.0, 2.0, (1.5, -0.75), (-2.25, 0.5)
    net = constructed_ifnet(a, b, flow0, flow1)
    h, w = 40, 56
    frames = _frames(7, h, w, seed=3)
    out, fps = interpolate(frames, FPS, 24, net, batch_size=3)
    assert fps == 24 and out.shape[0] == 10

    # The reference sees what the network sees: frames zero-padded to 128 x 128, warped, blended, cropped.
    padded = F.pad(frames.permute(0, 3, 1, 2), (0, 128 - w, 0, 128 - h))  # [7, 3, 128, 128]
    const = lambda f: torch.tensor(f).view(1, 2, 1, 1).expand(1, 2, 128, 128)  # noqa: E731
    moved0 = reference_warp(padded, const(flow0).expand(7, 2, 128, 128))
    moved1 = reference_warp(padded, const(flow1).expand(7, 2, 128, 128))
    for k, p in enumerate(frame_positions(7, FPS, 24)):
        if p.t == 0.0:
            want = frames[p.i0].double()
        else:
            s = 1 / (1 + math.exp(-(a * p.t + b)))
            want = (moved0[p.i0] * s + moved1[p.i1] * (1 - s))[:, :h, :w].permute(1, 2, 0)
        assert (out[k].double() - want).abs().max().item() < CANVAS_TOL, k
    # the test can fail: the wrong time (t -> 1 - t) or a wrong pair moves frames by far more than the tolerance
    p = frame_positions(7, FPS, 24)[1]
    s = 1 / (1 + math.exp(-(a * (1 - p.t) + b)))
    wrong = (moved0[0] * s + moved1[1] * (1 - s))[:, :h, :w].permute(1, 2, 0)
    assert (out[1].double() - wrong).abs().max().item() > 0.05


# --- batching, dtypes, errors ---------------------------------------------------------------------------------------


def test_batching_does_not_change_the_output(release):
    net = load_rife(release[1])
    frames = _frames(4, 48, 64, seed=4)
    ref, _ = interpolate(frames, FPS, 40, net, batch_size=1)  # 3 intervals of 1/16 s -> 8 frames, 5 by RIFE
    assert ref.shape == (8, 48, 64, 3)
    for bs in (2, 64):
        out, _ = interpolate(frames, FPS, 40, net, batch_size=bs)
        assert (out - ref).abs().max().item() < 1e-5, bs
    # the network really ran: the interpolated frames are neither copies nor plain averages of their neighbours
    pos = frame_positions(4, FPS, 40)
    k = next(i for i, p in enumerate(pos) if p.t > 0)
    assert (ref[k] - frames[pos[k].i0]).abs().max() > 0.05 and (ref[k] - frames[pos[k].i1]).abs().max() > 0.05


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_runs_and_stays_close_to_float32(release, dtype):
    frames = _frames(3, 32, 40, seed=6)
    ref, _ = interpolate(frames, FPS, 32, load_rife(release[1]))
    out, _ = interpolate(frames, FPS, 32, load_rife(release[1], dtype=dtype))
    assert out.dtype == torch.float32 and torch.equal(out[0::2], frames)
    assert (out - ref).abs().mean().item() < 0.01


def test_rate_and_argument_errors():
    net = constructed_ifnet(-40.0, 20.0)
    frames = _frames(3, 16, 16)
    with pytest.raises(UserError, match=r"target_fps=12 is below the video's fps=16.*target_fps >= fps"):
        interpolate(frames, 16, 12, net)
    with pytest.raises(UserError, match="target_fps=0"):
        interpolate(frames, 16, 0, net)
    with pytest.raises(UserError, match=r"\[F, H, W, 3\]"):
        interpolate(frames.permute(0, 3, 1, 2), 16, 32, net)
    with pytest.raises(UserError, match="batch_size=0"):
        interpolate(frames, 16, 32, net, batch_size=0)
    with pytest.raises(UserError, match="multiples of 64"):
        net(torch.zeros(1, 3, 96, 128), torch.zeros(1, 3, 96, 128), 0.5)
    assert IFNetConfig().size_multiple(0.5) == 128 and IFNetConfig().size_multiple(4.0) == 16
    same, fps = interpolate(frames, 16, 16, net)
    assert fps == 16 and torch.equal(same, frames)

    cfg = VFIConfig.from_dict({"algo": "rife", "target_fps": 24, "model_path": "/x/flownet.pkl"})
    assert cfg == VFIConfig(target_fps=24, model_path="/x/flownet.pkl")
    cfg.check_fps(16)
    with pytest.raises(UserError, match="below the video's fps=30"):
        cfg.check_fps(30)
    with pytest.raises(UserError, match="algo='film' is not supported"):
        VFIConfig.from_dict({"algo": "film", "target_fps": 24, "model_path": "m"})
    with pytest.raises(UserError, match=r"unknown keys \['target_fp'\].*missing target_fps"):
        VFIConfig.from_dict({"target_fp": 24, "model_path": "m"})
