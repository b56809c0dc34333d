"""HunyuanVideo-1.5 (LightX2V's model classes ``hunyuan_video_1.5`` and ``hunyuan_video_1.5_distill``): text- and
image-to-video, 480p / 720p.

Stages and the request: :mod:`lightx2v.models.hunyuan_video_15.stages`; the family's own config keys:
:mod:`lightx2v.models.hunyuan_video_15.config`; its registration with the engine (stage adapters, messages,
builders): :mod:`lightx2v.models.hunyuan_video_15.family`. Importing this package loads nothing.
"""
