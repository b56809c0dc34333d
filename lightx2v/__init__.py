"""lightx2v: fast, memory-lean inference for video diffusion models."""

from lightx2v.pipeline import LightX2VPipeline

__all__ = ["LightX2VPipeline"]
__version__ = "0.1.0"
