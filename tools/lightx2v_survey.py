#!/usr/bin/env python3
"""Write docs/lightx2v_compat_survey.md from tests/data/lightx2v_wan_*.json and the key meanings below.

Counts and values come from the data (``tools/lightx2v_corpus.py`` writes it); the meaning and class of each key
were read in LightX2V's code at the corpus commit (where the key is read is named in the meaning) and are ours.
Classes:

* ``ours``: implemented with LightX2V's meaning (``lightx2v/config.py`` ``ALL_KEYS``, README's config tables);
* ``ours-off``: known to us but accepted only with its "off" value today (``NOT_YET`` / ``FIXED``);
* ``arch``: describes the checkpoint (LightX2V merges the model's config.json into its config); to accept when it
  matches the model we load and to name the mismatch otherwise (issue 12 item 3);
* ``kernel``: picks an implementation of the same math (issue 12 item 2);
* ``issue N``: a feature another open issue adds (13 server, 14 disaggregation, 15 multi-GPU, 21 RIFE / TAE /
  LightVAE, 22 platforms);
* ``not-impl``: a LightX2V feature we do not implement (the feature is named);
* ``inert``: no LightX2V code reads it for these configs (a leftover); to accept and ignore.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data"

# key -> (class, meaning in LightX2V; where it is read)
MEANINGS: dict[str, tuple[str, str]] = {
    # --- sampling / sizes (ours) ----------------------------------------------------------------------------
    "infer_steps": ("ours", "number of denoising steps (scheduler `infer_steps`); with `denoising_step_list` LightX2V uses len(list)"),
    "target_video_length": ("ours", "frames of the output video (4k+1); our `num_frames`"),
    "target_height": ("ours", "output height in pixels; our `height`"),
    "target_width": ("ours", "output width in pixels; our `width`"),
    "sample_guide_scale": ("ours", "CFG scale; a list [high, low] gives the two Wan2.2 A14B experts their own (MultiModelStruct)"),
    "sample_shift": ("ours", "flow-matching timestep shift of the scheduler"),
    "enable_cfg": ("ours", "run the unconditional branch and apply CFG (false: one forward per step)"),
    "fps": ("ours", "frame rate of the saved video (and of audio muxing)"),
    "self_attn_1_type": ("ours", "attention backend of the self-attention (ATTN_WEIGHT_REGISTER name); sparse/approximate ones are other features, see values"),
    "cross_attn_1_type": ("ours", "attention backend of the text cross-attention"),
    "cross_attn_2_type": ("ours", "attention backend of the image (CLIP) cross-attention of Wan2.1 I2V/FLF2V"),
    "denoising_step_list": ("ours", "step-distilled models: the training timesteps evaluated (WanStepDistillScheduler: sigma index 1000 - t)"),
    "boundary": ("ours", "Wan2.2 A14B: high-noise expert while t >= boundary*1000 (MultiModelStruct); with a distill model class the runner uses boundary_step_index instead"),
    "boundary_step_index": ("ours", "wan2.2_moe_distill: the first N steps on the high-noise expert (MultiDistillModelStruct); ignored by wan2.2_moe"),
    "changing_resolution": ("ours", "denoise the first steps at lower resolution (WanScheduler4ChangingResolution)"),
    "changing_resolution_steps": ("ours", "step indices at which the resolution changes (default [infer_steps // 2])"),
    "resolution_rate": ("ours", "per stage: fraction of the target size; a rate 1.0 stage runs at full size"),
    "use_image_encoder": ("ours", "false: no CLIP image tokens (Wan2.2 I2V); LightX2V default true, set false for wan2.2* model classes"),
    "vae_stride": ("ours", "VAE compression (t, h, w): [4, 8, 8] Wan2.1 VAE, [4, 16, 16] Wan2.2 VAE"),
    # --- weights files (ours) -------------------------------------------------------------------------------
    "dit_original_ckpt": ("ours", "one .safetensors file (or folder) with the DiT's float weights instead of model_path's (base_model.py)"),
    "high_noise_original_ckpt": ("ours", "A14B: file/folder of the high-noise expert's float weights (wan_runner / wan_distill_runner)"),
    "low_noise_original_ckpt": ("ours", "A14B: file/folder of the low-noise expert's float weights (the distill runner takes it only when dit_quantized is false)"),
    # --- fewer steps ------------------------------------------------------------------------------------------
    "lora_configs": ("ours", "list of {path, strength[, name: high_noise_model|low_noise_model]}; merged at load unless lora_dynamic_apply"),
    "feature_caching": ("ours", "feature-cache method (WanTransformerInfer* classes); values: see below (Tea, Mag, FirstBlock ours)"),
    "teacache_thresh": ("ours", "TeaCache: accumulated relative-L1 threshold above which a step is computed"),
    "coefficients": ("ours", "TeaCache: rescaling polynomial(s); [ret_steps poly, non-ret poly] chosen by use_ret_steps"),
    "use_ret_steps": ("ours", "TeaCache: measure the modulated input (retention steps variant) and always compute the first steps"),
    "magcache_K": ("ours", "MagCache: max consecutive skipped steps"),
    "magcache_thresh": ("ours", "MagCache: accumulated error threshold"),
    "magcache_retention_ratio": ("ours", "MagCache: fraction of the first steps always computed"),
    "magcache_ratios": ("ours", "MagCache: calibrated per-step magnitude ratios [cond, uncond]"),
    "magcache_calibration": ("ours", "MagCache: record the ratios instead of caching"),
    "residual_diff_threshold": ("ours", "FirstBlock/DualBlock/DynamicBlock caches: residual change threshold"),
    "downsample_factor": ("ours", "FirstBlock/DualBlock/DynamicBlock caches: spatial downsampling of the compared residual"),
    # --- speed / memory (ours) --------------------------------------------------------------------------------
    "cpu_offload": ("ours", "DiT weights on the host, moved in by offload_granularity (model/block/phase)"),
    "offload_granularity": ("ours", "model | block | phase (WanOffloadTransformerInfer)"),
    "lazy_load": ("ours", "read each block from the safetensors on disk while offloading (bounded host RAM)"),
    "t5_cpu_offload": ("ours", "T5 text encoder kept on CPU (LightX2V also runs it on CPU)"),
    "clip_cpu_offload": ("ours", "CLIP image encoder on CPU; LightX2V default = cpu_offload"),
    "vae_cpu_offload": ("ours", "VAE on CPU; LightX2V default = cpu_offload for some runners"),
    "unload_modules": ("ours", "load encoders/VAE/DiT per stage and free them after"),
    "use_tiling_vae": ("ours", "tiled VAE encode/decode"),
    "use_compile": ("ours", "torch.compile the transformer infer functions"),
    "dit_quant_scheme": ("ours", "DiT linear scheme (MM_WEIGHT_REGISTER name): values below; fp8*/int8* ours, nvfp4/mxfp*/gguf not"),
    "dit_quantized": ("ours-off", "the DiT linears are quantized with dit_quant_scheme (load a pre-quantized checkpoint or quantize at load); today refused, issue 12 item 1"),
    "dit_quantized_ckpt": ("ours-off", "file/folder of pre-quantized DiT weights (LightX2V's layout: X.weight + X.weight_scale); issue 12 item 1"),
    "high_noise_quantized_ckpt": ("ours-off", "A14B high-noise expert's pre-quantized weights (taken when dit_quantized); issue 12 item 1"),
    "low_noise_quantized_ckpt": ("ours-off", "A14B low-noise expert's pre-quantized weights (taken when dit_quantized); issue 12 item 1"),
    "t5_quantized": ("ours-off", "quantized T5 text encoder (t5_quant_scheme, t5_quantized_ckpt); we accept only false"),
    "clip_quantized": ("ours-off", "quantized CLIP image encoder (clip_quant_scheme, clip_quantized_ckpt); we accept only false"),
    "text_len": ("ours-off", "T5 token length of the context (512 for Wan); FIXED to 512 in ours"),
    "patch_size": ("ours-off", "DiT patch (1, 2, 2); FIXED in ours (the checkpoint's)"),
    "parallel": ("issue 15", "multi-GPU: {seq_p_size, seq_p_attn_type ulysses|ring, cfg_p_size, tensor_p_size, seq_p_fp8_comm, vae_p_size...}; NOT_YET in ours"),
    # --- kernel selectors -------------------------------------------------------------------------------------
    "rms_norm_type": ("kernel", "RMSNorm implementation of q/k norms (RMS_WEIGHT_REGISTER; Wan default sgl-kernel): torch, sgl-kernel, mlu_rms_norm, npu_rms_norm, iluvatar_rms_norm, intel_xpu: same math; fp32_variance / one-pass (not in Wan configs) are precision variants (variance in fp32, as ours computes)"),
    "layer_norm_type": ("kernel", "LayerNorm implementation (LN_WEIGHT_REGISTER: torch, Triton; npu_layer_norm / gcu_layer_norm come from lightx2v_platform's ops for Ascend / Enflame): same math"),
    "modulate_type": ("kernel", "adaLN modulate x*(1+scale)+shift: 'triton' (fuse_scale_shift_kernel, Wan default) or anything else = torch; same math"),
    "rope_type": ("kernel", "RoPE implementation (ROPE_REGISTER; Wan default flashinfer_rope): torch_complex_rope, torch_real_rope, flashinfer_rope, npu_rope, gcu_wan_rope, mlu_rope, iluvatar_wan_rope; same math"),
    "tp_rms_norm_type": ("issue 15", "RMSNorm kernel under tensor parallel (TensorParallelFP32, IntelTensorParallelFP32)"),
    "tp_mm_type": ("issue 15", "linear kernel under tensor parallel (IntelTensorParallel)"),
    "clean_cuda_cache": ("kernel", "torch.cuda.empty_cache() after blocks/stages (memory hygiene, no change to the math)"),
    # --- architecture (from the checkpoint) ------------------------------------------------------------------
    "dim": ("arch", "DiT hidden size (Wan config.json; LightX2V merges it); must match the checkpoint"),
    "ffn_dim": ("arch", "DiT FFN size; must match the checkpoint"),
    "freq_dim": ("arch", "timestep sinusoid size (256); must match"),
    "num_heads": ("arch", "DiT attention heads; must match"),
    "num_layers": ("arch", "DiT blocks; must match"),
    "in_dim": ("arch", "DiT input channels (16 T2V, 36 I2V, 48 TI2V); must match"),
    "out_dim": ("arch", "DiT output channels; must match"),
    "eps": ("arch", "norm epsilon (1e-6); must match"),
    "model_type": ("arch", "Wan config.json model_type (t2v/i2v/flf2v/ti2v); must match"),
    "cross_attn_norm": ("arch", "Wan config.json: LayerNorm before cross-attention (true for every Wan); must match"),
    "qk_norm": ("arch", "Wan config.json: RMSNorm on q/k (true); must match"),
    "window_size": ("arch", "Wan config.json: local attention window ([-1, -1] = global); must match"),
    "text_dim": ("arch", "T5 context width 4096 (set_config default); must match"),
    "num_channels_latents": ("arch", "latent channels (16 Wan2.1 VAE, 48 Wan2.2 VAE); must match the VAE (issue 12 item 3)"),
    "num_train_timesteps": ("arch", "scheduler training timesteps (1000); must be 1000 for Wan"),
    "vae_dtype": ("arch", "dtype of the VAE (read by the dreamzero runner, and by disagg's encoder payload); a precision choice"),
    # --- other issues -------------------------------------------------------------------------------------------
    "disagg_mode": ("issue 14", "role of this process in disaggregated deployment: encoder | transformer | decoder (decode) | controller"),
    "disagg_config": ("issue 14", "disaggregation transport: bootstrap_addr/room, engine ranks, Mooncake/RDMA settings"),
    "rdma_buffer_slot_size": ("issue 14", "disaggregation: RDMA buffer slot size (disagg_mixin / controller)"),
    "clip_embed_dim": ("issue 14", "disaggregation: CLIP feature width of the transferred payload (disagg_mixin)"),
    "seq_parallel": ("issue 15", "sequence parallel on (set from parallel by set_parallel_config)"),
    "use_tae": ("issue 21", "decode with the tiny autoencoder (TAEHV/LightTAE) at tae_path"),
    "tae_path": ("issue 21", "TAE weights file (taew2_1.pth)"),
    "vae_type": ("issue 21", "VAE variant: mg_lightvae_v2 (Matrix-Game LightVAE); baseline = the full VAE"),
    "lightvae_pruning_rate": ("issue 21", "LightVAE channel pruning rate (0.5 / 0.75)"),
    "video_frame_interpolation": ("issue 21", "RIFE frame interpolation after decode: {algo: rife, target_fps, model_path}"),
    "sub_servers": ("issue 13", "server: remote dit/encoder/prompt_enhancer services (default_runner)"),
    # --- LightX2V features we do not implement ------------------------------------------------------------------
    "t5_quant_scheme": ("not-impl", "T5 quantization scheme (feature: quantized T5 encoder)"),
    "t5_quantized_ckpt": ("not-impl", "pre-quantized T5 weights (feature: quantized T5 encoder)"),
    "clip_quant_scheme": ("not-impl", "CLIP quantization scheme (feature: quantized CLIP encoder)"),
    "clip_quantized_ckpt": ("not-impl", "pre-quantized CLIP weights (feature: quantized CLIP encoder)"),
    "t5_original_ckpt": ("not-impl", "T5 weights path outside model_path (feature: separate encoder paths; wan_animate2 / motus)"),
    "t5_tokenizer_path": ("not-impl", "T5 tokenizer folder outside model_path (feature: separate encoder paths)"),
    "clip_original_ckpt": ("not-impl", "CLIP weights path outside model_path (feature: separate encoder paths)"),
    "vae_path": ("not-impl", "VAE weights path outside model_path (feature: separate VAE path; also LightVAE, issue 21)"),
    "model_path": ("not-impl", "model folder given in the JSON (LightX2V: CLI/constructor value wins); feature: model_path in the config"),
    "model_cls": ("not-impl", "model class in the JSON (here wan2.2_matrix_game3); feature: Matrix-Game 3"),
    "task": ("not-impl", "task in the JSON (i2v; disagg baselines); feature: task in the config"),
    "image_path": ("issue 14", "input image in the JSON (disagg baselines' request payload)"),
    "seed": ("not-impl", "seed in the JSON (used as the request's seed by disagg/server paths)"),
    "enable_reuse": ("not-impl", "keep the runner's loaded modules between requests (base_runner; feature: module reuse)"),
    "enable_dynamic_cfg": ("not-impl", "wan2.1_distill: CFG scale embedded as an input of the distilled DiT (pre_infer; feature: dynamic-CFG distill)"),
    "cfg_scale": ("not-impl", "not Wan's: LTX2/NeoPP CFG scale key; read by no Wan runner (feature: none for Wan)"),
    "offload_ratio": ("not-impl", "fraction of blocks offloaded (read by the Qwen-Image offload infer only; feature: partial offload)"),
    "num_disk_workers": ("not-impl", "lazy-load reader threads (cosmos3 / ltx2 offload); feature: threaded lazy load"),
    "vae_offload_cache": ("not-impl", "VAE feature cache offloaded to CPU (wan_audio_runner; feature: VAE cache offload)"),
    "audio_mux_prefer_copy": ("not-impl", "mux audio without re-encoding (default_runner; feature: audio output)"),
    "audio_sr": ("not-impl", "audio sample rate (feature: Wan audio / s2v models)"),
    "video_duration": ("not-impl", "seconds of audio-driven video (feature: Wan audio models)"),
    "causal_rope_type": ("not-impl", "RoPE for causal/autoregressive Wan (wan_causal_rope; feature: autoregressive Wan, self-forcing / audio)"),
    "ar_config": ("not-impl", "autoregressive generation: kv cache, frames per block, local attention (feature: self-forcing / causal Wan)"),
    "num_frame_per_block": ("not-impl", "frames per autoregressive block (feature: causal Wan / dreamzero)"),
    "num_blocks": ("not-impl", "autoregressive blocks (feature: CausVid); read by no code at this commit"),
    "num_fragments": ("not-impl", "autoregressive fragments (feature: CausVid); read by no code at this commit"),
    "frame_seq_length": ("not-impl", "tokens per latent frame (feature: CausVid)"),
    "num_frames": ("not-impl", "latent frames per causal chunk (feature: CausVid)"),
    "sparse_type": ("not-impl", "CausVid config leftover; read by no code at this commit"),
    "inject_sample_info": ("not-impl", "Matrix-Game config leftover; read by no code at this commit"),
    "action_config": ("not-impl", "keyboard/mouse action conditioning (feature: Matrix-Game 2/3)"),
    "mode": ("not-impl", "Matrix-Game 2 scene mode: universal, gta_drive, templerun (feature: Matrix-Game 2)"),
    "streaming": ("not-impl", "Matrix-Game 2 streaming generation (feature: Matrix-Game 2)"),
    "num_output_frames": ("not-impl", "Matrix-Game 2 output frames (feature: Matrix-Game 2)"),
    "sub_model_folder": ("not-impl", "Matrix-Game sub-model folder (feature: Matrix-Game 2/3)"),
    "sub_model_name": ("not-impl", "Matrix-Game sub-model file (feature: Matrix-Game 2)"),
    "mouse_dim_in": ("not-impl", "Matrix-Game mouse action width (feature: Matrix-Game)"),
    "keyboard_dim_in": ("not-impl", "Matrix-Game keyboard action width (feature: Matrix-Game 3)"),
    "use_base_model": ("not-impl", "Matrix-Game 3 base vs distilled model (feature: Matrix-Game 3)"),
    "clip_frame": ("not-impl", "Matrix-Game 3 frames per clip (feature: Matrix-Game 3)"),
    "first_clip_frame": ("not-impl", "Matrix-Game 3 frames of the first clip (feature: Matrix-Game 3)"),
    "past_frame": ("not-impl", "Matrix-Game 3 conditioning frames (feature: Matrix-Game 3)"),
    "conditioning_latent_frames": ("not-impl", "Matrix-Game 3 conditioning latent frames (feature: Matrix-Game 3)"),
    "incremental_segment_frames": ("not-impl", "Matrix-Game 3 frames per segment (feature: Matrix-Game 3)"),
    "num_iterations": ("not-impl", "Matrix-Game 3 segments (feature: Matrix-Game 3)"),
    "interactive": ("not-impl", "Matrix-Game 3 interactive control (feature: Matrix-Game 3)"),
    "dancer_stage": ("not-impl", "Wan-Dancer stage global | local (feature: Wan-Dancer)"),
    "music_inject_layers": ("not-impl", "Wan-Dancer music injection blocks (feature: Wan-Dancer)"),
    "adapter_attn_type": ("not-impl", "Wan-Animate face adapter attention backend (feature: Wan2.2-Animate)"),
    "refert_num": ("not-impl", "Wan-Animate overlap frames between segments (feature: Wan2.2-Animate)"),
    "replace_flag": ("not-impl", "Wan-Animate replace (true) vs animate mode (feature: Wan2.2-Animate)"),
    "auto_target_shape": ("not-impl", "Wan-Animate: size from the reference (feature: Wan2.2-Animate)"),
    "use_31_block": ("not-impl", "Wan-Animate 2: 31-block variant (feature: Wan2.2-Animate 2)"),
    "use_img_emb": ("not-impl", "Wan-Animate 2: image embedding on/off (feature: Wan2.2-Animate 2)"),
    "log_scale": ("not-impl", "Wan-Animate 2 attention log-scale (feature: Wan2.2-Animate 2)"),
    "refer_offset_t": ("not-impl", "Wan-Animate 2 reference RoPE offset, time (feature: Wan2.2-Animate 2)"),
    "refer_offset_h": ("not-impl", "Wan-Animate 2 reference RoPE offset, height (feature: Wan2.2-Animate 2)"),
    "refer_offset_w": ("not-impl", "Wan-Animate 2 reference RoPE offset, width (feature: Wan2.2-Animate 2)"),
    "refer_stride": ("not-impl", "Wan-Animate 2 reference RoPE time stride (feature: Wan2.2-Animate 2)"),
    "infer_frames": ("not-impl", "Wan2.2-S2V frames per clip (feature: Wan2.2-S2V)"),
    "motion_frames": ("not-impl", "Wan2.2-S2V motion frames (feature: Wan2.2-S2V)"),
    "drop_first_motion": ("not-impl", "Wan2.2-S2V drops the first motion frames (feature: Wan2.2-S2V)"),
    "num_repeat": ("not-impl", "Wan2.2-S2V clip repeats (feature: Wan2.2-S2V)"),
    "max_area": ("not-impl", "Wan2.2-S2V max pixel area of the reference (feature: Wan2.2-S2V)"),
    "target_fps": ("not-impl", "output fps for audio/RIFE paths (Wan audio; RIFE uses its own key, issue 21)"),
    "general_sparse_attn_setting": ("not-impl", "general_sparse_attn: mask generator (sla/sparge/nbhd/svg) + sparse operator (feature: sparse attention)"),
    "dynamic_sparse_attn_setting": ("not-impl", "dynamic_sparse_attn: operator + sparsity ratio (feature: sparse attention)"),
    "nbhd_attn_setting": ("not-impl", "nbhd_attn: neighbourhood attention coefficients (feature: sparse attention)"),
    "draft_attn_sparsity_ratio": ("not-impl", "draft_attn sparsity (feature: sparse attention)"),
    "sparge_attn_setting": ("not-impl", "sparge_attn sparsity (feature: SpargeAttn)"),
    "sparge": ("not-impl", "SpargeAttn tuned weights on; read by no code at this commit (feature: SpargeAttn)"),
    "sparge_ckpt": ("not-impl", "SpargeAttn tuned weights file; read by no code at this commit (feature: SpargeAttn)"),
    "spas_sage_attn2_setting": ("not-impl", "spas_sage_attn2 sparse mode/sparsity (feature: SpargeAttn-Sage)"),
    "spas_sage_attn3_setting": ("not-impl", "spas_sage_attn3 sparse mode/sparsity (feature: SpargeAttn-Sage3)"),
    "spas_flash_attn4_setting": ("not-impl", "spas_flash_attn4 sparse mode/sparsity (feature: sparse FA4)"),
    "rainfusion_attn_setting": ("not-impl", "rainfusion_attn pool/sparsity/backend (feature: RainFusion sparse attention)"),
    "sol_attn_setting": ("not-impl", "sol_attn dense layers/steps, kv splits (feature: SOL sparse attention)"),
    # --- inert (read by nothing at this commit) ------------------------------------------------------------------
    "comment": ("inert", "free text (Enflame GCU config); read by nothing"),
    "comment_parallel": ("inert", "free text; read by nothing"),
    "convert_model_dtype": ("inert", "read by no LightX2V code at this commit"),
    "cpu_offload_activations": ("inert", "read by no LightX2V code at this commit"),
    "rotary_chunk": ("inert", "read by no code (LightX2V reads rope_chunk); a misspelt key in its config"),
}


FINDINGS = [
    "## Behaviours read in LightX2V's code that the config layer must match", "",
    "- `boundary` + `boundary_step_index` together (e.g. `configs/wan22/wan_moe_i2v_4090.json`, which also has a "
    "`denoising_step_list`): `wan2.2_moe` (WanRunner) builds `MultiModelStruct(..., config['boundary'])` and a "
    "`WanScheduler` (the step list and `boundary_step_index` are not read unless `scheduler_type` is "
    "`WanStepDistillScheduler`); `wan2.2_moe_distill` builds `MultiDistillModelStruct(..., "
    "config['boundary_step_index'])` with `Wan22StepDistillScheduler` (steps = len(denoising_step_list); "
    "`boundary` not read). Neither refuses the other key.",
    "- The step-distill update (`WanStepDistillScheduler.step_post`, same in `Wan22StepDistillScheduler`): "
    "x0 = x - sigma_i * v; if not the last step x = x0 + sigma_{i+1} * v (no fresh noise), in float32.",
    "- `create_generator`: see the API section; the config lives on the pipeline object (`dict_like`), "
    "`generate` returns `runner.run_pipeline(input_info)`.",
    "- Kernel selectors are looked up in registries by name; the Wan defaults are `rms_norm_type` sgl-kernel, "
    "`layer_norm_type` torch, `modulate_type` triton, `rope_type` flashinfer_rope (create_generator's keyword "
    "path sets torch_complex_rope). `norm_modulate_backend` and `double_precision_rope` are create_generator "
    "arguments read only by the LTX2 model (no Wan config carries them).",
    "",
]


def _short(v) -> str:
    s = json.dumps(v, ensure_ascii=False)
    return s if len(s) <= 40 else s[:37] + "..."


def main() -> None:
    configs = json.loads((DATA / "lightx2v_wan_configs.json").read_text())
    classes = json.loads((DATA / "lightx2v_wan_config_classes.json").read_text())
    examples = json.loads((DATA / "lightx2v_wan_examples.json").read_text())
    api = json.loads((DATA / "lightx2v_api.json").read_text())
    count, values = Counter(), defaultdict(Counter)
    for cfg in configs.values():
        for k, v in cfg.items():
            count[k] += 1
            values[k][json.dumps(v, sort_keys=True, ensure_ascii=False)] += 1
    missing = sorted(set(count) - set(MEANINGS))
    if missing:
        raise SystemExit(f"keys without a meaning: {missing}")
    src = classes["_source"]
    lines = [
        "# LightX2V compatibility survey (Wan)",
        "",
        f"Corpus: {src['repository']} at `{src['commit']}`, written by `tools/lightx2v_corpus.py` into "
        "`tests/data/` (regenerate this page with `tools/lightx2v_survey.py`).",
        "",
        f"- **{len(configs)} Wan configs** of `configs/` (the issue counted 242; the rule is in "
        "`tools/lightx2v_corpus.py`: own `model_cls`, else the `--model_cls` its scripts/docs run it with, else "
        "`configs/bench/` = Wan2.1 I2V per LightX2V's benchmark page, else `wan` in the file name; a model class is "
        "Wan when it starts with `wan`). Skipped: " + "; ".join(f"`{k}` ({v})" for k, v in classes["_skipped"].items()),
        "- how each was decided: " + ", ".join(f"{n} by {how}" for how, n in
                                               Counter(v["how"] for k, v in classes.items() if not k.startswith("_")).most_common()),
        "- model classes they are run with: " + ", ".join(
            f"`{m}` {n}" for m, n in Counter(m for k, v in classes.items() if not k.startswith("_")
                                             for m in v["model_cls"]).most_common()) + " (no class found: "
        + str(sum(1 for k, v in classes.items() if not k.startswith("_") and not v["model_cls"])) + ")",
        f"- {len(count)} distinct keys; {len([k for k in examples if not k.startswith('_')])} Wan examples "
        "(`examples/wan/*.py` + the seed's two Intel XPU usage examples).",
        "",
    ]
    by_class = Counter(MEANINGS[k][0] for k in count)
    lines += ["Keys by class: " + ", ".join(f"{c} {n}" for c, n in sorted(by_class.items())), ""]
    lines += ["Classes: `ours` implemented; `ours-off` known but only its off value accepted today; `arch` describes "
              "the checkpoint (accept when it matches); `kernel` picks an implementation of the same math; "
              "`issue N` another open issue adds it; `not-impl` a LightX2V feature we do not implement (named); "
              "`inert` read by no LightX2V code at this commit.", ""]
    order = ["ours", "ours-off", "kernel", "arch", "issue 13", "issue 14", "issue 15", "issue 21", "issue 22",
             "not-impl", "inert"]
    for cls in order:
        keys = sorted((k for k in count if MEANINGS[k][0] == cls), key=lambda k: (-count[k], k))
        if not keys:
            continue
        lines += [f"## {cls}", "", "| key | configs | values seen (count) | meaning in LightX2V |", "|---|---|---|---|"]
        for k in keys:
            vs = values[k]
            shown = ", ".join(f"`{_short(json.loads(v))}` ({n})" for v, n in vs.most_common(12))
            if len(vs) > 12:
                shown += f", ... {len(vs) - 12} more"
            lines.append(f"| `{k}` | {count[k]} | {shown} | {MEANINGS[k][1]} |")
        lines.append("")
    lines += FINDINGS + _values_section(values) + _attention_section(values) + _api_section(api) + _examples_section(examples)
    (ROOT / "docs").mkdir(exist_ok=True)
    (ROOT / "docs" / "lightx2v_compat_survey.md").write_text("\n".join(lines) + "\n")
    print(f"{len(count)} keys, {len(configs)} configs")


# What LightX2V's attention names are, for the values of *_attn_*_type (ATTN_WEIGHT_REGISTER, read at the commit).
ATTENTION = {
    "torch_sdpa": "exact; ours", "flash_attn2": "exact; ours if flash-attn is installed", "flash_attn3": "exact; ours if "
    "installed", "flash_attn4": "exact (FA4, Blackwell); not ours", "sage_attn2": "INT8 QK / FP8 PV (SageAttention2); "
    "our sage_attn (other helper: alias)", "sage_attn3": "FP4 SageAttention3; not ours", "radial_attn": "sparse (Radial "
    "Attention); other helper adds it", "svg_attn": "sparse (Sparse VideoGen)", "svg2_attn": "sparse (Sparse VideoGen 2)",
    "nbhd_attn": "sparse (neighbourhood)", "draft_attn": "sparse (DraftAttention)", "sparge_attn": "sparse (SpargeAttn)",
    "general_sparse_attn": "sparse (mask generator + operator)", "dynamic_sparse_attn": "sparse (dynamic)",
    "spas_sage_attn2": "sparse SpargeAttn-Sage2", "spas_sage_attn3": "sparse SpargeAttn-Sage3", "spas_flash_attn4":
    "sparse FA4", "rainfusion_attn": "sparse (RainFusion)", "sol_attn": "sparse (SOL)", "flex_attn": "exact via "
    "torch flex_attention", "ring": "sequence parallel (issue 15)", "ulysses": "sequence parallel (issue 15)",
    "npu_flash_attn": "exact, Ascend NPU (issue 22)", "mlu_flash_attn": "exact, Cambricon MLU (issue 22)",
    "mlu_sage_attn": "Sage on MLU (issue 22)", "flash_attn_hygon_dcu": "exact, Hygon DCU (issue 22)",
    "flash_attn_enflame_gcu": "exact, Enflame GCU (issue 22)", "intel_xpu_flash_attn": "exact, Intel XPU SYCL (issue 22)",
    "intel_xpu_cute_attn": "exact, Intel XPU CUTLASS-SYCL (issue 22)", "iluvatar_flash_attn": "exact, Iluvatar (issue 22)",
    "metax_sage_attn2": "Sage on MetaX (issue 22)", "aiter_attn": "exact, AMD aiter (issue 22)",
    "sage_attn2_k_int8_v_fp8": "SageAttention2 variant",
}


# Values of the feature-valued keys: ours or the feature they name (read in LightX2V's registries / infer classes).
VALUE_NOTES = {
    "feature_caching": {"NoCaching": "ours (off)", "Tea": "ours", "Mag": "ours", "FirstBlock": "ours",
                        "DualBlock": "not-impl: DualBlock cache (first 5 blocks decide; middle blocks' residual reused)",
                        "DynamicBlock": "not-impl: DynamicBlock cache (per-block residual skipping)",
                        "TaylorSeer": "not-impl: TaylorSeer (Taylor-series feature forecasting)",
                        "Ada": "not-impl: AdaCache (adaptive per-step caching)",
                        "Custom": "not-impl: Custom cache (TeaCache decision + TaylorSeer forecast of skipped steps)"},
    "dit_quant_scheme": {"fp8-sgl": "ours (fp8 alias)", "fp8-vllm": "ours (fp8 alias)", "fp8-q8f": "ours (fp8 alias)",
                         "fp8-torchao": "ours (fp8 alias)", "fp8-triton": "ours (fp8 alias)",
                         "fp8-intel-xpu": "fp8 on Intel XPU (issue 22); our fp8 math", "fp8": "ours",
                         "int8-sgl": "ours (int8 alias)", "int8-vllm": "ours (int8 alias)", "int8-q8f": "ours (int8 alias)",
                         "int8-torchao": "ours (int8 alias)", "int8-triton": "ours (int8 alias)", "int8": "ours",
                         "nvfp4": "not-impl: NVFP4 4-bit weights (Blackwell)", "mxfp4": "not-impl: MXFP4",
                         "mxfp6": "not-impl: MXFP6", "mxfp8": "not-impl: MXFP8", "Default": "ours (no quantization)",
                         "int8-npu": "int8 on Ascend NPU (issue 22); our int8 math",
                         "int8-vllm-hygon-dcu": "int8 on Hygon DCU (issue 22); our int8 math",
                         "gguf": "not-impl: GGUF-quantized weights (llama.cpp K-quants)"},
    "offload_granularity": {"model": "ours", "block": "ours", "phase": "ours"},
}


def _values_section(values) -> list[str]:
    lines = ["## Values of the feature-valued keys", "", "| key | value | configs | status |", "|---|---|---|---|"]
    for key, notes in VALUE_NOTES.items():
        for v, n in values[key].most_common():
            name = json.loads(v)
            note = notes.get(name) or next((t for pre, t in notes.items() if str(name).startswith(pre + "-")), None)
            lines.append(f"| `{key}` | `{name}` | {n} | {note or 'not classified'} |")
    return lines + [""]


def _attention_section(values) -> list[str]:
    seen = Counter()
    for k in ("self_attn_1_type", "cross_attn_1_type", "cross_attn_2_type", "adapter_attn_type"):
        for v, n in values[k].items():
            seen[json.loads(v)] += n
    lines = ["## Attention names seen (all *_attn_*_type values)", "", "| name | uses | what it is |", "|---|---|---|"]
    for name, n in seen.most_common():
        lines.append(f"| `{name}` | {n} | {ATTENTION.get(name, 'not in ATTN_WEIGHT_REGISTER at this commit')} |")
    return lines + [""]


def _api_section(api) -> list[str]:
    lines = ["## LightX2VPipeline API (lightx2v/pipeline.py at the commit)", "",
             "`create_generator(config_json=X)` only merges the JSON into the pipeline's attributes; without "
             "config_json it calls `set_infer_config`, which assigns every key listed under `set_infer_config` "
             "(the named arguments and the defaults of the unnamed ones alike) and keeps all other attributes, "
             "so a JSON's `t5_cpu_offload`, `use_tiling_vae`, ... survive a second keyword call while its "
             "`infer_steps`, `target_*`, `fps`, `boundary`, ... are replaced (by the defaults where not named). "
             "`enable_cfg` is set to `guidance_scale != 1`.", ""]
    for name, sig in api.items():
        if name.startswith("_") and name != "__init__":
            continue
        params = ", ".join(p["name"] + (f"={_short(p['default'])}" if "default" in p else "") for p in sig["params"])
        lines.append(f"- `{name}({params})`: sets {', '.join(f'`{s}`' for s in sig['sets'])}")
    return lines + [""]


def _examples_section(examples) -> list[str]:
    lines = ["## Wan examples (call sequences)", ""]
    for name, ex in examples.items():
        if name.startswith("_"):
            continue
        calls = []
        for s in ex["steps"]:
            if "call" in s:
                kw = ", ".join(f"{k}={_short(v)}" for k, v in s["kwargs"].items())
                if "args" in s:
                    kw = ", ".join([_short(a) for a in s["args"]] + ([kw] if kw else []))
                calls.append(f"`{s['call']}({kw})`")
            else:
                calls.append(f"`pipe.{s['set_attribute']} = {_short(s['value'])}`")
        lines.append(f"- `{name}`: " + "; ".join(calls))
    return lines + [""]


if __name__ == "__main__":
    main()
