"""Work on the decoded frames that every video family shares, wrapped around a family's decoder stage (so that a
decoder role of a disaggregated deployment does it too): frame interpolation (LightX2V's
``video_frame_interpolation``: RIFE to a higher frame rate)."""

from __future__ import annotations

from lightx2v.engine.messages import Frames
from lightx2v.engine.progress import RunContext


class FrameInterpolation:
    """A decoder stage whose frames are resampled by RIFE to ``vfi.target_fps`` (the video is written at that rate).
    The network is loaded with the stage, on its device; frames go through it in batches of ``vfi.batch_size``
    pairs."""

    def __init__(self, decoder, vfi, dtype):
        from lightx2v.models.rife import load_rife

        self.inner, self.vfi = decoder, vfi
        self.device = decoder.device
        self.rife = load_rife(vfi.model_path, device=self.device, dtype=dtype)

    def __getattr__(self, name):  # the family decoder's own attributes (vae, ...)
        return getattr(self.inner, name)

    def check_request(self, request) -> None:
        self.inner.check_request(request)
        self.vfi.check_fps(request.sampling.fps)

    def check_sampling(self, s) -> None:
        self.inner.check_sampling(s)
        self.vfi.check_fps(s.fps)

    def __call__(self, latents, ctx: RunContext) -> Frames:
        from lightx2v.models.rife import interpolate

        out = self.inner(latents, ctx)
        ctx.check()
        with ctx.stage("frame interpolation"):
            frames, fps = interpolate(out.frames.to(self.device), out.fps, self.vfi.target_fps, self.rife,
                                      batch_size=self.vfi.batch_size)
        return Frames(frames.cpu(), fps, out.request)


def with_postprocessing(decoder, config):
    """The decoder stage with the generic frame work ``config`` asks for."""
    vfi = getattr(config, "vfi", None)
    if vfi is None:
        return decoder
    from lightx2v.engine.device import resolve_device_dtype

    return FrameInterpolation(decoder, vfi, resolve_device_dtype(config.runtime.device, config.runtime.dtype)[1])
