"""Z-Image (Tongyi-MAI/Z-Image-Turbo): text-to-image with a single-stream DiT, Qwen3 text features and the FLUX VAE.

Modules: ``arch`` (config dataclasses), ``dit``, ``vae``, ``text_encoder``, ``scheduler``, ``checkpoint`` (the
diffusers layout, strict loaders), ``stages`` (encoder / transformer / decoder stages and ``generate``), ``tiny``
(the built-in tiny model).
"""
