"""LightX2V's config vocabulary beyond the keys lightx2v implements: what each other key is, and how we answer it.

LightX2V (ModelTC/LightX2V) configs carry keys of features we do not implement, keys that choose a kernel for the
same math, and keys LightX2V's Wan runners never read. The config layer (:mod:`lightx2v.config`) asks this table so
that a LightX2V config gets one of three answers, never a misleading "did you mean":

* a feature we lack: ``LightX2V key `X` (feature: Y) is not implemented in lightx2v`` (:func:`not_implemented`);
* a kernel selector (``rms_norm_type``, ``rope_type`` ...): every value LightX2V registers for the same math is
  accepted, and one log line says which implementation runs; a value that is other math is refused;
* a key no LightX2V Wan code reads (``convert_model_dtype``, free-text comments ...): accepted and ignored, with a
  log line, as LightX2V ignores it.

The facts (names, registries, what reads what) come from LightX2V at commit f8aee98 (``docs/lightx2v_compat_survey.md``
lists every key of its Wan configs with its meaning).
"""

from __future__ import annotations

from lightx2v.errors import UserError

NOT_IMPLEMENTED_PATTERN = r"LightX2V (key|value) `[^`]+` \(feature: .+\) is not implemented in lightx2v"


def not_implemented(key: str, feature: str, value=None) -> UserError:
    """The one message for a LightX2V key (or a key's value) whose feature lightx2v does not implement."""
    if value is None:
        return UserError(f"LightX2V key `{key}` (feature: {feature}) is not implemented in lightx2v; remove it")
    return UserError(f"LightX2V value `{key}: {value!r}` (feature: {feature}) is not implemented in lightx2v")


# --- features we do not implement (key -> feature name) ----------------------------------------------------------
# Keys of features that other open issues add are here too until they land; then they move to the config layer.
FEATURES: dict[str, str] = {
    # multi-GPU (issue 15)
    "seq_parallel": "multi-GPU sequence parallelism",
    "tp_rms_norm_type": "tensor-parallel RMSNorm (multi-GPU)",
    "tp_mm_type": "tensor-parallel linears (multi-GPU)",
    # disaggregated deployment (issue 14)
    "disagg_mode": "disaggregated encoder / transformer / decoder deployment",
    "disagg_config": "disaggregated deployment transport",
    "rdma_buffer_slot_size": "disaggregated deployment transport",
    "clip_embed_dim": "disaggregated deployment payload",
    "image_path": "an input image in the config (disaggregated request payload)",
    # server (issue 13)
    "sub_servers": "remote encoder / DiT / prompt-enhancer services",
    "enable_reuse": "reusing the previous request's encoder outputs (service)",
    # lightweight VAEs beyond TAE / LightVAE
    "lightvae_pruning_rate": "LightVAE with another pruning rate",
    "vae_type": "Matrix-Game's LightVAE variant",
    # quantized encoders
    "t5_quant_scheme": "quantized T5 text encoder",
    "t5_quantized_ckpt": "quantized T5 text encoder",
    "clip_quant_scheme": "quantized CLIP image encoder",
    "clip_quantized_ckpt": "quantized CLIP image encoder",
    # separate encoder / VAE paths
    "t5_original_ckpt": "a T5 checkpoint outside model_path",
    "t5_tokenizer_path": "a T5 tokenizer outside model_path",
    "clip_original_ckpt": "a CLIP checkpoint outside model_path",
    "vae_dtype": "a VAE dtype of its own",
    # autoregressive / causal Wan, self-forcing, CausVid
    "causal_rope_type": "autoregressive (causal) Wan",
    "ar_config": "autoregressive (causal) Wan / self-forcing",
    "sf_model_path": "self-forcing (autoregressive) Wan",
    "frame_seq_length": "CausVid",
    "num_frame_per_block": "autoregressive (causal) Wan",
    # sparse attention settings
    "general_sparse_attn_setting": "general sparse attention",
    "dynamic_sparse_attn_setting": "dynamic sparse attention",
    "draft_attn_sparsity_ratio": "DraftAttention",
    "nbhd_attn_setting": "neighbourhood sparse attention",
    "rainfusion_attn_setting": "RainFusion sparse attention",
    "sol_attn_setting": "SOL sparse attention",
    "sparge_attn_setting": "SpargeAttn",
    "spas_flash_attn4_setting": "block-sparse FlashAttention 4",
    "spas_sage_attn2_setting": "SpargeAttn-Sage2",
    "spas_sage_attn3_setting": "SpargeAttn-Sage3",
    # Wan2.2-Animate (1 and 2)
    "adapter_attn_type": "Wan2.2-Animate",
    "refert_num": "Wan2.2-Animate",
    "replace_flag": "Wan2.2-Animate",
    "auto_target_shape": "Wan2.2-Animate",
    "use_31_block": "Wan2.2-Animate 2",
    "log_scale": "Wan2.2-Animate 2",
    "refer_offset_h": "Wan2.2-Animate 2",
    "refer_offset_t": "Wan2.2-Animate 2",
    "refer_offset_w": "Wan2.2-Animate 2",
    "refer_stride": "Wan2.2-Animate 2",
    "use_img_emb": "Wan2.2-Animate 2",
    # Matrix-Game 2 / 3
    "streaming": "Matrix-Game 2",
    "mode": "Matrix-Game 2",
    "num_output_frames": "Matrix-Game 2",
    "sub_model_folder": "Matrix-Game 2/3",
    "sub_model_name": "Matrix-Game 2",
    "action_config": "Matrix-Game 2/3 action conditioning",
    "mouse_dim_in": "Matrix-Game action conditioning",
    "keyboard_dim_in": "Matrix-Game 3",
    "clip_frame": "Matrix-Game 3",
    "conditioning_latent_frames": "Matrix-Game 3",
    "first_clip_frame": "Matrix-Game 3",
    "incremental_segment_frames": "Matrix-Game 3",
    "interactive": "Matrix-Game 3",
    "num_iterations": "Matrix-Game 3",
    "past_frame": "Matrix-Game 3",
    "use_base_model": "Matrix-Game 3",
    # Wan-Dancer, Wan2.2-S2V, Wan audio
    "dancer_stage": "Wan-Dancer",
    "music_inject_layers": "Wan-Dancer",
    "drop_first_motion": "Wan2.2-S2V",
    "infer_frames": "Wan2.2-S2V",
    "max_area": "Wan2.2-S2V",
    "motion_frames": "Wan2.2-S2V",
    "num_repeat": "Wan2.2-S2V",
    "audio_sr": "audio-driven Wan",
    "video_duration": "audio-driven Wan",
    "audio_mux_prefer_copy": "audio output",
    # other
    "enable_dynamic_cfg": "dynamic-CFG step distillation (the CFG scale as a DiT input)",
    "cfg_scale": "dynamic-CFG step distillation (the CFG scale as a DiT input)",
    "seed": "a seed in the config (disaggregated / server requests)",
    "task": "the task in the config (pass task to LightX2VPipeline or --task)",
    "model_path": "the model path in the config (pass model_path to LightX2VPipeline or --model_path)",
    "model_cls": "the model class in the config (pass model_cls to LightX2VPipeline or --model_cls)",
    "use_prompt_enhancer": "prompt enhancer",
    "mm_config": "per-layer quantization config (mm_config)",
}

# LightX2V's model classes (its RUNNER_REGISTER names, and wan2.1_causvid of its scripts) -> the model; the pipeline
# refuses those no registered family implements with not_implemented("model_cls", ...).
MODEL_CLASSES: dict[str, str] = {
    "wan2.1_mean_flow_distill": "Wan2.1 MeanFlow step distillation", "wan2.1_sf": "self-forcing Wan2.1",
    "wan2.1_sf_mtxg2": "Matrix-Game 2", "wan2.1_vace": "Wan2.1 VACE", "wan2.1_causvid": "CausVid",
    "wan2.2_animate": "Wan2.2-Animate", "wan22_animate2_distilled": "Wan2.2-Animate 2", "wan2.2_audio": "Wan2.2 audio",
    "wan2.2_matrix_game3": "Matrix-Game 3", "wan2.2_moe_vace": "Wan2.2 VACE", "wan2.2_s2v": "Wan2.2-S2V",
    "wan_dancer": "Wan-Dancer", "seko_talk": "SekoTalk", "seko_talk_ar": "SekoTalk (autoregressive)",
    "infinitetalk": "InfiniteTalk", "lingbot_va": "LingBot-VA", "lingbot_video": "LingBot video",
    "lingbot_world": "LingBot-World", "lingbot_world_fast": "LingBot-World (fast)", "dreamzero": "DreamZero",
    "fastwam": "FastWAM", "motus": "Motus", "bagel": "BAGEL", "cosmos3": "Cosmos 3", "ernie_image": "ERNIE-Image",
    "ernie_image_turbo": "ERNIE-Image Turbo", "flux2_dev": "FLUX.2 dev", "flux2_klein": "FLUX.2 klein",
    "hidream_o1_image": "HiDream-O1", "hunyuan3d": "Hunyuan3D", "hunyuan_image3": "HunyuanImage 3",
    "hunyuan_video_1.5": "HunyuanVideo-1.5", "hunyuan_video_1.5_distill": "HunyuanVideo-1.5 (distilled)",
    "longcat_image": "LongCat-Image", "ltx2": "LTX-2", "ltx2_5": "LTX-2.5", "ltx2_ar": "LTX-2 (autoregressive)",
    "minimax_h3": "MiniMax-H3", "neopp": "NeoPP", "qwen_image": "Qwen-Image", "seedvr2": "SeedVR2",
    "sensenova_vision": "SenseNova vision", "swiftvr": "SwiftVR", "worldmirror": "WorldMirror",
    "worldplay_ar": "WorldPlay (autoregressive)", "worldplay_bi": "WorldPlay", "worldplay_distill": "WorldPlay (distilled)",
}
# LightX2V's tasks beyond the ones our families do -> what they are.
TASKS: dict[str, str] = {
    "animate": "Wan2.2-Animate character animation", "vace": "VACE video editing", "s2v": "speech-to-video",
    "i2i": "image editing", "sr": "video super-resolution", "t2av": "text-to-audio-video",
    "i2av": "image-to-audio-video", "rs2v": "reference speech-to-video",
}

# Values of implemented keys that name a feature we lack: key -> {value: feature}.
FEATURE_VALUES: dict[str, dict] = {
    "feature_caching": {"Ada": "AdaCache", "Custom": "Custom cache (TeaCache decision + TaylorSeer forecast)",
                        "TaylorSeer": "TaylorSeer feature forecasting",
                        "DualBlock": "DualBlock cache", "DynamicBlock": "DynamicBlock cache"},
    "dit_quant_scheme": {"nvfp4": "NVFP4 4-bit weights", "mxfp4": "MXFP4 weights", "mxfp6-mxfp8": "MXFP6 weights",
                         "mxfp8": "MXFP8 weights", "fp8-b128-deepgemm": "FP8 weights in 128x128 blocks (DeepGEMM)",
                         **{f"gguf-{q}": "GGUF (llama.cpp) quantized weights"
                            for q in ("Q8_0", "Q6_K", "Q5_K_S", "Q5_K_M", "Q5_0", "Q5_1", "Q4_K_S", "Q4_K_M", "Q4_0",
                                      "Q4_1", "Q3_K_S", "Q3_K_M")}},
}

# Keys whose "off" value is accepted (it asks for nothing): key -> the values that mean off.
OFF_VALUES: dict[str, tuple] = {
    "t5_quantized": (False,), "clip_quantized": (False,), "use_prompt_enhancer": (False,), "mm_config": ({},),
    "seq_parallel": (False,), "enable_reuse": (False,), "enable_dynamic_cfg": (False,), "streaming": (False,),
    "interactive": (False,), "replace_flag": (False,), "auto_target_shape": (False,), "t5_quantized_ckpt": ("",),
    "clip_quantized_ckpt": ("",),
}
ON_FEATURES = {"t5_quantized": "quantized T5 text encoder", "clip_quantized": "quantized CLIP image encoder"}

# Keys that change nothing for a Wan model in LightX2V at f8aee98 (so they change nothing here either): key -> why.
INERT: dict[str, str] = {
    "convert_model_dtype": "LightX2V reads it nowhere",
    "cpu_offload_activations": "LightX2V reads it nowhere",
    "comment": "free text",
    "comment_parallel": "free text",
    "rotary_chunk": "LightX2V reads it nowhere (its key is rope_chunk)",
    "inject_sample_info": "LightX2V reads it nowhere",
    "sparse_type": "LightX2V reads it nowhere",
    "num_blocks": "LightX2V reads it nowhere",
    "num_fragments": "LightX2V reads it nowhere",
    "sparge": "LightX2V reads it nowhere",
    "sparge_ckpt": "LightX2V reads it nowhere",
    "offload_ratio": "LightX2V reads it only in Qwen-Image's offload",
    "vae_offload_cache": "LightX2V reads it only in its Wan audio runner",
    "target_fps": "LightX2V reads it only in its audio and self-forcing runners (RIFE's is in "
                  "video_frame_interpolation)",
    "clean_cuda_cache": "torch.cuda.empty_cache() between blocks in LightX2V: memory hygiene that changes no result",
    "num_disk_workers": "lazy_load's reader threads in LightX2V; lightx2v reads with one background thread",
    # create_generator arguments that only LightX2V's LTX-2 reads
    "audio_fps": "LightX2V reads it only for LTX-2 (audio)",
    "distilled_sigma_values": "LightX2V reads it only for LTX-2",
}

# --- kernel selectors: the same math, another implementation -----------------------------------------------------
# key -> {value: what LightX2V runs}; every value is LightX2V's (its registries and lightx2v_platform's).
KERNEL_SELECTORS: dict[str, dict[str, str]] = {
    "rms_norm_type": {
        "torch": "PyTorch", "torch_native": "F.rms_norm", "sgl-kernel": "sgl-kernel", "fp32_variance": "PyTorch",
        "fp32_variance_qwen": "PyTorch", "self_forcing": "PyTorch", "one-pass": "Triton",
        "TensorParallel": "PyTorch", "TensorParallelFP32": "PyTorch", "IntelTensorParallelFP32": "Intel XPU",
        "npu_rms_norm": "Ascend NPU", "mlu_rms_norm": "Cambricon MLU", "iluvatar_rms_norm": "Iluvatar",
        "intel_xpu": "Intel XPU",
    },
    "layer_norm_type": {"torch": "PyTorch", "Triton": "Triton", "npu_layer_norm": "Ascend NPU",
                        "gcu_layer_norm": "Enflame GCU"},
    "rope_type": {
        "torch_complex_rope": "PyTorch (complex)", "torch_real_rope": "PyTorch (real)",
        "flashinfer_rope": "FlashInfer", "chunked_rope": "PyTorch, in chunks", "npu_rope": "Ascend NPU",
        "mlu_rope": "Cambricon MLU", "gcu_wan_rope": "Enflame GCU", "iluvatar_wan_rope": "Iluvatar",
    },
    # LightX2V's Wan: "triton" selects its fused kernel, any other value PyTorch
    "modulate_type": {"triton": "Triton", "torch": "PyTorch"},
    # read only by LightX2V's LTX-2 model (create_generator arguments); Wan runs the same math either way
    "norm_modulate_backend": {"torch": "PyTorch", "triton": "Triton"},
    "double_precision_rope": {True: "float64 RoPE (LTX-2 only)", False: "float32 RoPE (LTX-2 only)"},
}
# Values of those keys that are other models' math (LightX2V registers them for their own models).
OTHER_MATH: dict[str, dict[str, str]] = {
    "rope_type": {"wan_causal_rope": "causal Wan", "dreamzero_rope": "DreamZero", "cosmos3_rope": "Cosmos 3",
                  "ltx25_split_rope": "LTX-2.5", "minimax_h3_triton_rope": "MiniMax-H3", "mmrope3d": "SeedVR",
                  "rope3d": "SeedVR", "minimax_h3_xpu_rope": "MiniMax-H3"},
    "rms_norm_type": {"ltx25_fast": "LTX-2.5"},
}


def check_kernel_selector(key: str, value) -> None:
    """Raise UserError unless ``value`` is an implementation LightX2V registers for ``key`` with Wan's math."""
    table = KERNEL_SELECTORS[key]
    if key == "modulate_type" and isinstance(value, str):
        return  # LightX2V's Wan treats every value other than "triton" as PyTorch's modulate
    if key == "double_precision_rope":
        if not isinstance(value, bool):
            raise UserError(f"double_precision_rope={value!r} must be true or false")
        return
    if value in table:
        return
    other = OTHER_MATH.get(key, {}).get(value)
    if other is not None:
        raise UserError(f"{key}={value!r} is {other}'s implementation (other math than Wan's); Wan's: "
                        f"{', '.join(map(repr, table))}")
    raise UserError(f"{key}={value!r} is not an implementation LightX2V registers; allowed: "
                    f"{', '.join(map(repr, table))}")


def kernel_note(chosen: dict) -> str:
    """One log line: the kernels a config chose and what lightx2v runs instead (the same math)."""
    asked = ", ".join(f"{k}={v!r}" for k, v in chosen.items())
    return (f"kernel choices {asked}: lightx2v runs its own implementation of the same math (fused Triton "
            "RMSNorm+RoPE, LayerNorm+modulate and gated residual on CUDA, PyTorch elsewhere)")
