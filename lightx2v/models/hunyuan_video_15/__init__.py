"""HunyuanVideo-1.5 (LightX2V's model class ``hunyuan_video_1.5``): text- and image-to-video, 480p / 720p.

Stages and the request: :mod:`lightx2v.models.hunyuan_video_15.stages`; LightX2V config handling:
:mod:`lightx2v.models.hunyuan_video_15.config`. Importing this package loads nothing.
"""
