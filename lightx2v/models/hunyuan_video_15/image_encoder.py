"""The image side of HunyuanVideo-1.5 image-to-video, as diffusers' ``HunyuanVideo15ImageToVideoPipeline`` does it.

* The input image is resized and centre-cropped to the output size (:func:`resize_and_crop`: scaled with Lanczos so
  that it covers the target, then the middle pasted into the target canvas; diffusers' ``resize_mode="crop"``).
* SigLIP (transformers' ``SiglipVisionModel`` with its ``SiglipImageProcessor``, 384 px, 729 tokens of 1152 for the
  release) encodes that image; its ``last_hidden_state`` feeds the DiT's image projection.
* The VAE encodes the same image as a one-frame video (in [-1, 1]); its latents become frame 0 of the DiT's condition
  channels (``stages.py``).
"""

from __future__ import annotations

import torch
from PIL import Image

from lightx2v.io.image import to_model_tensor


def resize_and_crop(image: Image.Image, height: int, width: int) -> Image.Image:
    """Scale ``image`` (Lanczos) so that it covers ``width x height`` keeping its aspect ratio (integer sizes as
    diffusers computes them), then cut the centred ``width x height`` window (diffusers' ``_resize_and_crop``)."""
    ratio, src_ratio = width / height, image.width / image.height
    src_w = width if ratio > src_ratio else image.width * height // image.height
    src_h = height if ratio <= src_ratio else image.height * width // image.width
    resized = image.resize((src_w, src_h), resample=Image.LANCZOS)
    canvas = Image.new("RGB", (width, height))
    canvas.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
    return canvas


def vae_input(image: Image.Image) -> torch.Tensor:
    """RGB image -> ``[1, 3, 1, H, W]`` float32 in [-1, 1] (a one-frame video for the VAE encoder)."""
    return to_model_tensor(image, image.height, image.width)[:, :, None]


class SiglipImageEncoder:
    """``SiglipImageProcessor`` + ``SiglipVisionModel``: an RGB image -> ``[1, tokens, hidden]``."""

    def __init__(self, processor, model):
        self.processor = processor
        self.model = model

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device):
        """Move the model (the processor has no tensors); returns self."""
        self.model.to(device)
        return self

    @torch.inference_mode()
    def encode(self, image: Image.Image) -> torch.Tensor:
        pixels = self.processor.preprocess(images=image, do_resize=True, return_tensors="pt", do_convert_rgb=True)
        dtype = next(self.model.parameters()).dtype
        pixel_values = pixels["pixel_values"].to(device=self.device, dtype=dtype)
        return self.model(pixel_values=pixel_values).last_hidden_state
