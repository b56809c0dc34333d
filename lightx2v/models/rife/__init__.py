"""RIFE video frame interpolation (LightX2V's ``video_frame_interpolation: {algo: "rife", ...}``).

Entry points: :func:`load_rife` (``flownet.pkl`` -> :class:`IFNet`), :func:`interpolate` (frames at ``fps`` -> frames
at ``target_fps``) and :class:`VFIConfig` (the JSON block).
"""

from lightx2v.models.rife.checkpoint import RIFE_FILE, load_rife, save_rife
from lightx2v.models.rife.ifnet import IFNet, IFNetConfig, warp
from lightx2v.models.rife.interpolate import FramePosition, VFIConfig, frame_positions, interpolate

__all__ = ["RIFE_FILE", "IFNet", "IFNetConfig", "VFIConfig", "FramePosition", "frame_positions", "interpolate",
           "load_rife", "save_rife", "warp"]
