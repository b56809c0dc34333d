"""``LightX2VPipeline``: the Python API, compatible with LightX2V's.

    pipe = LightX2VPipeline(model_path="/models/Wan2.1-T2V-1.3B", model_cls="wan2.1", task="t2v")
    pipe.create_generator(infer_steps=50, height=480, width=832, num_frames=81, guidance_scale=5.0)
    pipe.generate(seed=42, prompt="a cat", negative_prompt="", save_result_path="out.mp4")

``create_generator`` loads the model (load-time settings: dtype, quantization, attention, offload, compile,
caching, LoRA) and sets the defaults of the sampling settings; ``generate`` runs one request, whose sampling
settings (size, frames, steps, guidance, shift, solver, ...) may differ from call to call without reloading.
With ``model_path=None`` the built-in tiny model of the task is used (random weights: its output is noise; it
exists to check an installation).

As in LightX2V, the config lives on the pipeline: the constructor's checkpoint arguments, the builder methods
(``enable_quantize``, ``enable_offload``, ``enable_lora``, ``enable_cache``, ``enable_lightvae``,
``enable_parallel``) and each ``create_generator`` call set the keys they name, a later call winning over an
earlier one. ``generate`` returns what LightX2V's returns: ``{"video": None}``, or ``{"video": frames}`` with
``return_result_tensor=True`` (a :class:`GenerationResult`, which also carries the saved ``path``).
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from lightx2v import compat
from lightx2v.config import GeneratorConfig, build_config, load_config_json, normalise_keys
from lightx2v.engine.family import all_tasks, default_model_cls, family_of
from lightx2v.engine.progress import CancelToken, ProgressCallback, RunContext
from lightx2v.engine.request import SAMPLING_KEYS, GenerationRequest
from lightx2v.engine.runner import Generator
from lightx2v.errors import UserError

log = logging.getLogger("lightx2v")


class GenerationResult(dict):
    """What ``generate`` returns, as LightX2V's does: ``{"video": None}`` when the result was only saved, or
    ``{"video": frames}`` with ``return_result_tensor=True`` (float ``[F, H, W, 3]`` in [0, 1], on the CPU).
    ``path``: the file written (str; a single frame asked as ``.mp4`` is written as ``.png``), or None."""

    def __init__(self, video=None, path: str | None = None):
        super().__init__(video=video)
        self.path = path

    @property
    def frames(self):
        return self["video"]


# --- logging: the timing line reaches a user who configured nothing ----------------------------------------------

_DEFAULT_HANDLER_FLAG = "_lightx2v_default_handler"


def _ensure_log_handler() -> None:
    """Attach a plain stderr handler to the "lightx2v" logger when nothing would show its INFO lines: it has no
    handler and the root logger has none (the caller configured no logging). Once the caller configures logging
    (a handler on the root or on "lightx2v"), ours is removed again and the level left to them. Nothing is
    configured at import."""
    logger = logging.getLogger("lightx2v")
    ours = [h for h in logger.handlers if getattr(h, _DEFAULT_HANDLER_FLAG, False)]
    others = [h for h in logger.handlers if not getattr(h, _DEFAULT_HANDLER_FLAG, False)]
    configured = bool(others) or bool(logging.getLogger().handlers)
    if ours and configured:
        for h in ours:
            logger.removeHandler(h)
        if getattr(logger, _DEFAULT_HANDLER_FLAG, False):
            logger.setLevel(logging.NOTSET)
            setattr(logger, _DEFAULT_HANDLER_FLAG, False)
    elif not ours and not configured:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        setattr(handler, _DEFAULT_HANDLER_FLAG, True)
        logger.addHandler(handler)
        if logger.level == logging.NOTSET:
            logger.setLevel(logging.INFO)
            setattr(logger, _DEFAULT_HANDLER_FLAG, True)


class LightX2VPipeline:
    def __init__(self, model_path: str | Path | None = None, model_cls: str | None = None, task: str = "t2v",
                 support_tasks: list | tuple | None = None, sf_model_path: str | None = None,
                 dit_original_ckpt: str | None = None, low_noise_original_ckpt: str | None = None,
                 high_noise_original_ckpt: str | None = None, transformer_model_name: str | None = None):
        """LightX2V's constructor arguments (by keyword; ``model_cls`` and ``task`` as LightX2V names them).

        ``dit_original_ckpt`` / ``high_noise_original_ckpt`` / ``low_noise_original_ckpt``: DiT weights outside
        ``model_path`` (a file or a folder), as the config keys of the same name. ``support_tasks``: the tasks
        ``generate(task=...)`` may ask for (LightX2V's runners use it for their inputs), checked against the model
        class. ``transformer_model_name``: the transformer sub-folder of families that have several (a config key
        of that family; other families have one transformer and ignore it, as LightX2V does).
        ``sf_model_path`` (self-forcing) is not implemented."""
        _ensure_log_handler()
        model_cls = model_cls or default_model_cls()
        from lightx2v.engine.family import model_classes

        if model_cls not in model_classes() and model_cls in compat.MODEL_CLASSES:
            raise compat.not_implemented("model_cls", compat.MODEL_CLASSES[model_cls], value=model_cls)
        family = family_of(model_cls)
        if task not in all_tasks() and task in compat.TASKS:
            raise compat.not_implemented("task", compat.TASKS[task], value=task)
        if task not in all_tasks():
            raise UserError(f"unknown task {task!r}; supported: {', '.join(all_tasks())}")
        if task not in family.model_classes[model_cls]:
            raise UserError(f"model_cls {model_cls!r} does not do task {task!r}; it does "
                            f"{', '.join(family.model_classes[model_cls])}")
        if model_path is not None and not Path(model_path).exists():
            raise UserError(f"model_path {str(model_path)!r} does not exist")
        if sf_model_path is not None:
            raise compat.not_implemented("sf_model_path", compat.FEATURES["sf_model_path"])
        tasks = tuple(support_tasks or ())
        if isinstance(support_tasks, str) or any(t not in family.model_classes[model_cls] for t in tasks):
            raise UserError(f"support_tasks={support_tasks!r}: model_cls {model_cls!r} does "
                            f"{', '.join(family.model_classes[model_cls])}")
        self.model_path = None if model_path is None else Path(model_path)
        self.model_cls, self.task, self.family = model_cls, task, family
        self.support_tasks = list(tasks)
        self.config: GeneratorConfig | None = None
        self.runner: Generator | None = None
        # what the constructor, the builder methods and create_generator calls set, kept on the pipeline as LightX2V
        # keeps its config: a later call changes only the keys it names (a config_json, then keyword arguments)
        self._json_values: dict[str, Any] = {}
        self._overrides: dict[str, Any] = {}
        ckpts = {"dit_original_ckpt": dit_original_ckpt, "low_noise_original_ckpt": low_noise_original_ckpt,
                 "high_noise_original_ckpt": high_noise_original_ckpt}
        if transformer_model_name is not None:
            if "transformer_model_name" in family.config_keys():
                ckpts["transformer_model_name"] = transformer_model_name
            else:
                log.info("transformer_model_name=%r ignored: model_cls %r has one transformer (LightX2V reads it for "
                         "HunyuanVideo-1.5's transformer/ sub-folders only)", transformer_model_name, model_cls)
        self._set("LightX2VPipeline()", **ckpts)

    # --- the config, kept on the pipeline --------------------------------------------------------------------------

    def __setattr__(self, name: str, value: Any) -> None:
        """LightX2V's pipeline is its config (``pipe.t5_cpu_offload = True`` sets that key): a config key assigned
        as an attribute is set as a keyword call of create_generator would set it; other attributes are ours."""
        if not name.startswith("_") and name not in _OWN_ATTRIBUTES and "_overrides" in self.__dict__ \
                and _is_config_key(name, self.family):
            self._set(f"pipe.{name} = ...", **{name: value})
            return
        super().__setattr__(name, value)

    def _set(self, source: str, **values: Any) -> None:
        """Set config keys as a keyword call of create_generator would (checked now, applied by the next
        create_generator); None: not given."""
        given = {k: v for k, v in values.items() if v is not None}
        normalise_keys(given, source, self.family)  # a feature we lack is refused here, by name
        self._overrides.update(given)

    def enable_quantize(self, dit_quantized: bool = False, text_encoder_quantized: bool = False,
                        image_encoder_quantized: bool = False, dit_quantized_ckpt: str | None = None,
                        low_noise_quantized_ckpt: str | None = None, high_noise_quantized_ckpt: str | None = None,
                        text_encoder_quantized_ckpt=False, image_encoder_quantized_ckpt=False,
                        quant_scheme: str = "fp8-sgl", text_encoder_quant_scheme: str | None = None,
                        skip_fp8_block_index=(0, 43, 44, 45, 46, 47)) -> None:
        """LightX2V's ``enable_quantize``: ``dit_quantized`` with ``quant_scheme`` (fp8-* / int8-*) loads
        pre-quantized DiT weights from ``dit_quantized_ckpt`` (experts: ``high/low_noise_quantized_ckpt``) or the
        model folder, quantizing float weights while loading. Quantized text / image encoders are not implemented.
        ``skip_fp8_block_index`` is read by LightX2V's LTX-2 only."""
        if text_encoder_quantized:
            raise compat.not_implemented("text_encoder_quantized", "quantized text encoder")
        if image_encoder_quantized:
            raise compat.not_implemented("image_encoder_quantized", "quantized image encoder")
        if not isinstance(dit_quantized, bool):
            raise UserError(f"dit_quantized={dit_quantized!r} must be true or false")
        self._set("enable_quantize()", dit_quantized=dit_quantized,
                  dit_quant_scheme=quant_scheme if dit_quantized else None, dit_quantized_ckpt=dit_quantized_ckpt,
                  low_noise_quantized_ckpt=low_noise_quantized_ckpt,
                  high_noise_quantized_ckpt=high_noise_quantized_ckpt)

    def enable_offload(self, cpu_offload: bool = False, offload_granularity: str = "block",
                       text_encoder_offload: bool = False, image_encoder_offload: bool = False,
                       vae_offload: bool = False) -> None:
        """LightX2V's ``enable_offload``: DiT offload (``cpu_offload``, ``offload_granularity``) and the encoders /
        VAE kept on the CPU between uses (``t5_cpu_offload``, ``clip_cpu_offload``, ``vae_cpu_offload``)."""
        self._set("enable_offload()", cpu_offload=cpu_offload, offload_granularity=offload_granularity,
                  t5_cpu_offload=text_encoder_offload, clip_cpu_offload=image_encoder_offload,
                  vae_cpu_offload=vae_offload)

    def enable_lora(self, lora_configs: list[dict], lora_dynamic_apply: bool = False) -> None:
        """LightX2V's ``enable_lora``: ``lora_configs`` (``[{"path", "strength"[, "name"]}]``), merged into the
        weights, or applied as a low-rank path beside them with ``lora_dynamic_apply`` (``switch_lora``)."""
        self._set("enable_lora()", lora_configs=lora_configs, lora_dynamic_apply=lora_dynamic_apply)

    def enable_cache(self, cache_method: str = "Tea", coefficients=(), teacache_thresh: float = 0.15,
                     use_ret_steps: bool = False, magcache_calibration: bool = False, magcache_K: int = 6,
                     magcache_thresh: float = 0.24, magcache_retention_ratio: float = 0.2,
                     magcache_ratios=()) -> None:
        """LightX2V's ``enable_cache``: ``feature_caching`` = ``cache_method`` with the keys of that method (Tea:
        coefficients, teacache_thresh, use_ret_steps; Mag: the magcache_* keys), as LightX2V sets them."""
        keys: dict[str, Any] = {"feature_caching": cache_method}
        if cache_method == "Tea":
            keys.update(coefficients=list(coefficients), teacache_thresh=teacache_thresh, use_ret_steps=use_ret_steps)
        elif cache_method == "Mag":
            keys.update(magcache_calibration=magcache_calibration, magcache_K=magcache_K,
                        magcache_thresh=magcache_thresh, magcache_retention_ratio=magcache_retention_ratio,
                        magcache_ratios=list(magcache_ratios))
        for k in [k for k in self._overrides if k in _CACHE_SETTINGS]:  # the method's keys replace the last one's
            del self._overrides[k]
        self._set("enable_cache()", **keys)

    def enable_lightvae(self, use_lightvae: bool = False, use_tae: bool = False, vae_path: str | None = None,
                        tae_path: str | None = None) -> None:
        """LightX2V's ``enable_lightvae``: decode with the tiny autoencoder (``use_tae``, ``tae_path``) or use the
        pruned LightVAE (``use_lightvae``, ``vae_path``). A ``lighttae`` file needs scaled latents, as in
        LightX2V."""
        need_scaled = True if use_tae and tae_path and "lighttae" in str(tae_path) else None
        self._set("enable_lightvae()", use_lightvae=use_lightvae, use_tae=use_tae, vae_path=vae_path,
                  tae_path=tae_path, need_scaled=need_scaled)

    def enable_parallel(self, cfg_p_size: int = 1, seq_p_size: int = 1, seq_p_attn_type: str = "ulysses") -> None:
        """LightX2V's ``enable_parallel``: sets ``parallel``; sizes above 1 need multi-GPU inference."""
        self._set("enable_parallel()", parallel={"cfg_p_size": cfg_p_size, "seq_p_size": seq_p_size,
                                                 "seq_p_attn_type": seq_p_attn_type})

    def _prepare(self, config_json, overrides: dict[str, Any]):
        """What create_generator does before any weight is read: the config (defaults < the model folder's <
        config_json < arguments, on top of what earlier calls set), its notes logged, the result's size checked.
        Returns (StageSpec, json values, override values); the pipeline is not changed."""
        from lightx2v.engine.family import StageSpec

        _ensure_log_handler()
        family = self.family
        defaults: dict[str, Any] = family.defaults(self.model_cls, self.task)
        model_path = self.model_path
        if model_path is None and family.tiny_defaults is not None:
            defaults.update(family.tiny_defaults(self.task, self.model_cls))
        elif model_path is not None:
            defaults.update(folder_defaults(model_path))
        json_values = dict(self._json_values)
        override_values = dict(self._overrides)
        if config_json is not None:
            new = load_config_json(config_json)
            json_values.update(new)
            for key in new:  # the later call wins
                override_values.pop(key, None)
        override_values.update({k: v for k, v in overrides.items() if v is not None})
        config = build_config(defaults, json_values, override_values, family=family, model_cls=self.model_cls)
        for note in config.notes:
            log.info("%s", note)
        check_output_size(config.sampling, family.output)
        if model_path is None:
            if family.tiny_model is None:
                raise UserError(f"model_cls {self.model_cls!r} has no built-in tiny model: pass model_path")
            model_path = family.tiny_model(self.task, self.model_cls)
        return StageSpec(Path(model_path), self.model_cls, self.task, config), json_values, override_values

    def check_generator(self, config_json: str | Path | None = None, **overrides: Any) -> GeneratorConfig:
        """What :meth:`create_generator` would build, checked without loading any weight: the config, and the
        family's checks against the checkpoint's files and headers (sizes, latent channels, expert settings).
        Returns the config; the pipeline is left as it was."""
        spec, _, _ = self._prepare(config_json, overrides)
        if self.family.check is not None:
            self.family.check(spec)
        return spec.config

    def create_generator(self, config_json: str | Path | None = None, **overrides: Any) -> "LightX2VPipeline":
        """Build the generator: defaults < the model folder's own defaults < ``config_json`` < keyword overrides.
        Loads the model weights. A second call keeps what earlier calls set and changes only the keys it names
        (as LightX2V's pipeline does: e.g. ``create_generator(config_json=...)`` then
        ``create_generator(infer_steps=9)``)."""
        spec, json_values, override_values = self._prepare(config_json, overrides)
        self.config = spec.config
        self._json_values, self._overrides = json_values, override_values
        t0 = time.perf_counter()
        encoder, transformer, decoder = self.family.build(spec)
        self.runner = Generator(self.family, self.model_cls, self.task, self.config, encoder, transformer, decoder,
                                info={"model_path": str(spec.model_path)})
        for stage in self.runner.stages:  # the defaults must make a valid request for this model
            stage.check_sampling(self.config.sampling)
        log.info("loaded %s on %s in %.1f s", spec.model_path, self.runner.device, time.perf_counter() - t0)
        return self

    def switch_lora(self, lora_path: str | list[dict], strength: float = 1.0) -> None:
        """Replace the LoRAs between requests without reloading the model (needs ``lora_mode: "dynamic"``, i.e.
        ``lora_dynamic_apply``). ``lora_path``: one file (LightX2V's call, with ``strength``; "" removes the LoRAs)
        or a list of ``lora_configs`` entries."""
        if self.runner is None:
            raise UserError("call create_generator() before switch_lora()")
        switch = getattr(self.runner.transformer, "switch_lora", None)
        if switch is None:
            raise UserError(f"model_cls {self.model_cls!r} does not support switch_lora")
        if isinstance(lora_path, (str, Path)):
            lora_path = [] if str(lora_path) == "" else [{"path": str(lora_path), "strength": strength}]
        switch(lora_path)

    def check_images(self, image_path, last_frame_path, task: str | None = None) -> list:
        """Check and read the image inputs the task needs (paths, PIL images or tensors) -> RGB PIL images.
        Callers can do this before any model is loaded, so that a bad image fails at once."""
        task = task or self.task
        if self.family.read_images is not None:  # the family's own image inputs (e.g. several edit images)
            return self.family.read_images(task, image_path, last_frame_path)
        if task in ("i2v", "flf2v") and image_path is None:
            raise UserError(f"task {task!r} needs an image: pass image_path")
        if task == "flf2v" and last_frame_path is None:
            raise UserError("task 'flf2v' needs last_frame_path")
        if task != "flf2v" and last_frame_path is not None:
            raise UserError(f"task {task!r} takes no last_frame_path; use task 'flf2v'")
        if task == "t2v" and image_path is not None:
            raise UserError("task 't2v' takes no image_path; use task 'i2v'")
        from lightx2v.io.image import load_image

        images = [load_image(image_path, "image_path")] if image_path is not None else []
        if last_frame_path is not None:
            images.append(load_image(last_frame_path, "last_frame_path"))
        return images

    def make_request(self, seed: int = 42, prompt: str = "", negative_prompt: str = "", image_path=None,
                     last_frame_path=None, save_result_path: str | Path | None = None,
                     return_result_tensor: bool = False, task: str | None = None, target_shape=None,
                     num_frames: int | None = None, lora_configs: list[dict] | None = None,
                     request_id: str | None = None, **sampling: Any) -> GenerationRequest:
        """A validated request from ``generate``'s arguments: the generator's sampling defaults with this call's
        overrides (``infer_steps``, ``height``/``width`` or LightX2V's ``target_shape=[h, w]``, ``num_frames``,
        ``guidance_scale``, ``sample_shift``, ``sample_solver``, ...; LightX2V's config names work too)."""
        if self.config is None:
            raise UserError("call create_generator() before generate()")
        task = task or self.task
        if target_shape is not None and len(target_shape) not in (0, 2):
            raise UserError(f"target_shape={list(target_shape)!r} must be [height, width]")
        if target_shape:
            sampling = {"height": int(target_shape[0]), "width": int(target_shape[1]), **sampling}
        if num_frames is not None:
            sampling["num_frames"] = num_frames
        changes = normalise_keys({k: v for k, v in sampling.items() if v is not None}, "generate() arguments",
                                 self.family)
        unknown = sorted(set(changes) - SAMPLING_KEYS)
        if unknown:
            raise UserError(f"generate() cannot change {unknown} per request (they are load-time settings: pass "
                            "them to create_generator); per-request settings: " + ", ".join(sorted(SAMPLING_KEYS)))
        if ("height" in changes or "width" in changes) and "aspect_ratio" not in changes:
            changes["aspect_ratio"] = None  # an explicit size replaces the generator's aspect ratio
        if "denoising_step_list" in changes and "infer_steps" not in changes:
            changes["infer_steps"] = len(changes["denoising_step_list"] or ()) or self.config.sampling.infer_steps
        s = replace(self.config.sampling, **{k: tuple(v) if isinstance(v, list) else v for k, v in changes.items()})
        images = self.check_images(image_path, last_frame_path, task)
        check_output_size(s, self.family.output)
        if save_result_path is not None:
            check_output_path(save_result_path, 1 if self.family.output == "image" else s.num_frames)
        extra = {"request_id": request_id} if request_id is not None else {}
        return GenerationRequest(task=task, sampling=s, prompt=prompt, negative_prompt=negative_prompt, seed=seed,
                                 images=tuple(images), save_result_path=save_result_path,
                                 return_result_tensor=return_result_tensor,
                                 loras=None if lora_configs is None else tuple(lora_configs), **extra)

    def generate(self, seed: int = 42, prompt: str = "", negative_prompt: str = "", image_path: str | None = None,
                 last_frame_path: str | None = None, save_result_path: str | Path | None = None,
                 return_result_tensor: bool = False, progress: bool = True, task: str | None = None,
                 target_shape=None, num_frames: int | None = None, callback: ProgressCallback | None = None,
                 cancel: CancelToken | None = None, **sampling: Any):
        """Run one request. Returns what LightX2V's ``generate`` returns: ``{"video": None}`` once the result is
        saved, ``{"video": frames}`` with ``return_result_tensor=True`` (frames: float ``[F, H, W, 3]`` in [0, 1];
        the file is written too when ``save_result_path`` is given), as a :class:`GenerationResult` whose ``path``
        is the file written. ``callback(stage, done, total)`` is called after every denoising step; setting
        ``cancel`` (a :class:`CancelToken`) stops the request at the next step with
        :class:`lightx2v.errors.Cancelled`."""
        _ensure_log_handler()
        if self.runner is None:
            raise UserError("call create_generator() before generate()")
        if task is not None and task != self.task and self.support_tasks and task not in self.support_tasks:
            raise UserError(f"task {task!r} is not in support_tasks {self.support_tasks}")
        request = self.make_request(seed=seed, prompt=prompt, negative_prompt=negative_prompt, image_path=image_path,
                                    last_frame_path=last_frame_path, save_result_path=save_result_path,
                                    return_result_tensor=return_result_tensor, task=task, target_shape=target_shape,
                                    num_frames=num_frames, **sampling)
        out = self.run(request, RunContext(progress=callback, cancel=cancel, show_progress_bar=progress))
        saved, frames = out if request.return_result_tensor else (out, None)
        return GenerationResult(frames, None if saved is None else str(saved))

    def run(self, request: GenerationRequest, ctx: RunContext | None = None):
        """Run a request made by :meth:`make_request` (what ``generate`` does after building it)."""
        from lightx2v.io.video import save_result

        ctx = ctx or RunContext()
        frames = self.runner.run(request, ctx)
        saved = None
        timings = dict(self.runner.last_timings)
        if request.save_result_path is not None:
            t0 = time.perf_counter()
            saved = save_result(frames.frames, request.save_result_path, frames.fps)
            timings["save"] = time.perf_counter() - t0
        log.info(" | ".join(f"{k} {v:.2f} s" for k, v in timings.items()))
        self.last_timings = timings
        if request.return_result_tensor:
            return saved, frames.frames
        return saved


FOLDER_DEFAULTS = "lightx2v_defaults.json"


def folder_defaults(model_path: Path) -> dict[str, Any]:
    """The defaults a model folder brings (``lightx2v_defaults.json``: config keys, e.g. the built-in tiny models'
    sizes), at the "defaults" tier: a config JSON and arguments still win."""
    path = Path(model_path) / FOLDER_DEFAULTS
    return load_config_json(path) if path.is_file() else {}


_OWN_ATTRIBUTES = frozenset({"model_path", "model_cls", "task", "family", "support_tasks", "config", "runner",
                              "last_timings"})


def _is_config_key(name: str, family) -> bool:
    from lightx2v.config import COMPAT_KEYS, all_keys

    return name in COMPAT_KEYS or name in all_keys(family)


_CACHE_SETTINGS = frozenset({"feature_caching", "coefficients", "teacache_thresh", "use_ret_steps",
                             "magcache_calibration", "magcache_K", "magcache_thresh", "magcache_retention_ratio",
                             "magcache_ratios", "residual_diff_threshold", "downsample_factor"})


def check_output_path(path: str | Path, frames: int | None = None) -> Path:
    """Before any model runs: ``path`` is a file type we write (``.mp4``; one frame: ``.png``, ``.jpg``, ``.jpeg``,
    ``.webp``, or ``.mp4``, written as ``.png``), its folder exists or can be created, and a file can be written
    there. ``frames``: the frames of the result, when known."""
    from lightx2v.io.video import IMAGE_SUFFIXES, VIDEO_SUFFIXES

    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in VIDEO_SUFFIXES + IMAGE_SUFFIXES:
        raise UserError(f"save_result_path {str(path)!r}: unsupported file type {path.suffix or '(none)'!r}; "
                        f"allowed: {', '.join(VIDEO_SUFFIXES)} (a video), {', '.join(IMAGE_SUFFIXES)} (one frame)")
    if frames is not None and frames > 1 and suffix not in VIDEO_SUFFIXES:
        raise UserError(f"save_result_path {str(path)!r} is an image file name but the result has {frames} frames; "
                        f"use {', '.join(VIDEO_SUFFIXES)}")
    if path.is_dir():
        raise UserError(f"save_result_path {str(path)!r} is a folder; name a file in it (e.g. {str(path / 'out.mp4')!r})")
    folder = path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the output folder {str(folder)!r}: {e.strerror or e}") from None
    if not folder.is_dir():
        raise UserError(f"output folder {str(folder)!r} is not a directory")
    try:  # the folder accepts a new file (a read-only mount, /proc or a full disk fail here, not after the run)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".lightx2v-write-test-"):
            pass
    except OSError as e:
        raise UserError(f"cannot write to the output folder {str(folder)!r}: {e.strerror or e}") from None
    if path.exists() and not os.access(path, os.W_OK):
        raise UserError(f"save_result_path {str(path)!r} exists and is not writable")
    return path


def _memory_bytes() -> tuple[int | None, int | None]:
    """(total, available) host memory in bytes, or None where the system does not say."""
    total = avail = None
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f if line.split()[1:2]}
        total, avail = info.get("MemTotal"), info.get("MemAvailable")
    except (OSError, ValueError, IndexError):
        try:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            pass
    return total, avail


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def check_output_size(s, output: str = "video") -> None:
    """Refuse a result that cannot fit in host memory, and warn about one that takes much of it, before anything
    runs. The decoded video is ``F x H x W x 3`` float32 values, held twice when decoding ends (the autoencoder's
    ``[3, F, H, W]`` output and the ``[F, H, W, 3]`` result); the rest of the generation's memory comes on top.
    ``s``: the request's SamplingConfig; ``output``: the family's ("image": one frame)."""
    frames = 1 if output == "image" else s.num_frames
    need = 2 * frames * s.height * s.width * 3 * 4
    total, avail = _memory_bytes()
    what = (f"num_frames={frames} at {s.height}x{s.width}: decoding it takes at least {_gib(need)} (the float32 "
            "frames, twice)")
    if total is not None and need > total:
        raise UserError(f"{what}, more than this machine's {_gib(total)} of memory; ask for fewer frames or a "
                        "smaller size")
    if avail is not None and need > avail / 4:
        log.warning("%s, %d%% of the %s of memory available now; the generation needs more on top", what,
                    round(100 * need / avail), _gib(avail))
