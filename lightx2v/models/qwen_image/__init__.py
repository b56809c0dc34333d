"""Qwen-Image: text-to-image (Qwen-Image, -2512) and image editing (Qwen-Image-Edit: one image; Edit-2509 / -2511:
one or more), matching diffusers' QwenImagePipeline / QwenImageEditPipeline / QwenImageEditPlusPipeline.

Modules (plain PyTorch, the release's diffusers layout loaded strictly, each stage loading only its own weights):

    arch.py          config dataclasses read from transformer/ and vae/ config.json; ASPECT_RATIOS; variants
    dit.py           the 20B double-stream MMDiT (MSRoPE over image and text tokens, adaLN, zero_cond_t); hook plan
    vae.py           the VAE: Wan2.1's architecture and modules, single frames run as 2D networks
    text_encoder.py  Qwen2.5-VL through transformers (chat templates, dropped header tokens, image tokens)
    scheduler.py     flow-matching Euler with the release's resolution-dependent (exponential) shift
    checkpoint.py    layout (model_index.json -> variant) and the strict DiT (fp8 / int8 at load) / scheduler loaders
    stages.py        QwenImageRequest / QwenImageOptions, the Encoder / Transformer / Decoder stages, generate()
    trt.py           TensorRT VAE engines (ONNX export + check, build_trt_engines, runtime with PyTorch fallback)
    build_trt.py     the ``lightx2v build-trt`` sub-command
    tiny.py          write_tiny_model(): the built-in tiny model (t2i / edit / edit_plus)
    family.py        the engine's wiring: model_cls ``qwen_image`` (+ LightX2V's aliases), tasks t2i / i2i

Use, through the engine (LightX2V's API)::

    pipe = LightX2VPipeline(model_path="/models/Qwen-Image-2512", model_cls="qwen_image", task="t2i")
    pipe.create_generator(config_json="configs/qwen_image/qwen_image_t2i_2512.json")
    pipe.generate(seed=42, prompt="a cat", save_result_path="cat.png")
    pipe = LightX2VPipeline(model_path="/models/Qwen-Image-Edit-2511", model_cls="qwen_image", task="i2i")
    pipe.create_generator(config_json="configs/qwen_image/qwen_image_i2i_2511.json")
    pipe.generate(prompt="make it night", image_path="a.png,b.png", save_result_path="night.png")

or the stages directly::

    from lightx2v.models.qwen_image.stages import QwenImageRequest, generate
    frames = generate("/models/Qwen-Image-2512", QwenImageRequest(prompt="a cat", aspect_ratio="16:9",
                      infer_steps=50, guidance_scale=4.0, seed=42), device="cuda", dtype=torch.bfloat16)
    # frames: [1, H, W, 3] float32 in [0, 1]

Request fields (LightX2V's names): ``prompt``, ``negative_prompt`` (default " "), ``seed``, ``task`` (t2i | i2i),
``height``/``width`` (multiples of 16) or ``aspect_ratio`` (16:9 1664x928, 9:16, 1:1 1328x1328, 4:3 1472x1104, 3:4,
3:2 1584x1056, 2:3; t2i default 16:9; i2i default: the last image's aspect ratio at ~1024**2 pixels),
``infer_steps``, ``guidance_scale`` (true CFG with norm rescaling above 1; LightX2V's ``sample_guide_scale``),
``enable_cfg``, ``sample_shift`` (None: the release's resolution-dependent shift; a number: a fixed shift, as
LightX2V), ``images``. Options (per load; LightX2V's config keys): ``attn_type``, ``prompt_template_encode``,
``prompt_template_encode_start_idx``, ``USE_IMAGE_ID_IN_PROMPT``, ``CONDITION_IMAGE_SIZE``, ``resize_mode``
("adaptive"), ``vae_type`` ("baseline" | "tensorrt") + ``trt_vae_config`` ({trt_engine_path, multi_profile}),
``dit_original_ckpt``; ``configs/qwen_image/*.json`` are LightX2V's configs restricted to these keys.
"""
