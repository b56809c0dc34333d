"""``LightX2VPipeline``: the Python API, compatible with LightX2V's.

    pipe = LightX2VPipeline(model_path="/models/Wan2.1-T2V-1.3B", model_cls="wan2.1", task="t2v")
    pipe.create_generator(infer_steps=50, height=480, width=832, num_frames=81, guidance_scale=5.0)
    pipe.generate(seed=42, prompt="a cat", negative_prompt="", save_result_path="out.mp4")

``create_generator`` loads the model (load-time settings: dtype, quantization, attention, offload, compile,
caching, LoRA) and sets the defaults of the sampling settings; ``generate`` runs one request, whose sampling
settings (size, frames, steps, guidance, shift, solver, ...) may differ from call to call without reloading.
With ``model_path=None`` the built-in tiny model of the task is used (random weights: its output is noise; it
exists to check an installation).
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from lightx2v.config import GeneratorConfig, build_config, load_config_json, normalise_keys
from lightx2v.engine.family import all_tasks, default_model_cls, family_of
from lightx2v.engine.progress import CancelToken, ProgressCallback, RunContext
from lightx2v.engine.request import SAMPLING_KEYS, GenerationRequest
from lightx2v.engine.runner import Generator
from lightx2v.errors import UserError

log = logging.getLogger("lightx2v")


class LightX2VPipeline:
    def __init__(self, model_path: str | Path | None = None, model_cls: str | None = None, task: str = "t2v"):
        model_cls = model_cls or default_model_cls()
        family = family_of(model_cls)
        if task not in all_tasks():
            raise UserError(f"unknown task {task!r}; supported: {', '.join(all_tasks())}")
        if task not in family.model_classes[model_cls]:
            raise UserError(f"model_cls {model_cls!r} does not do task {task!r}; it does "
                            f"{', '.join(family.model_classes[model_cls])}")
        if model_path is not None and not Path(model_path).exists():
            raise UserError(f"model_path {str(model_path)!r} does not exist")
        self.model_path = None if model_path is None else Path(model_path)
        self.model_cls, self.task, self.family = model_cls, task, family
        self.config: GeneratorConfig | None = None
        self.runner: Generator | None = None
        # what create_generator calls set, kept on the pipeline as LightX2V keeps its config: a later call changes
        # only the keys it names (a config_json, then keyword arguments)
        self._json_values: dict[str, Any] = {}
        self._overrides: dict[str, Any] = {}

    def create_generator(self, config_json: str | Path | None = None, **overrides: Any) -> "LightX2VPipeline":
        """Build the generator: defaults < the model folder's own defaults < ``config_json`` < keyword overrides.
        Loads the model weights. A second call keeps what earlier calls set and changes only the keys it names
        (as LightX2V's pipeline does: e.g. ``create_generator(config_json=...)`` then
        ``create_generator(infer_steps=9)``)."""
        from lightx2v.engine.family import StageSpec

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
        self.config = build_config(defaults, json_values, override_values, family=family)
        self._json_values, self._overrides = json_values, override_values
        if model_path is None:
            if family.tiny_model is None:
                raise UserError(f"model_cls {self.model_cls!r} has no built-in tiny model: pass model_path")
            model_path = family.tiny_model(self.task, self.model_cls)
        t0 = time.perf_counter()
        encoder, transformer, decoder = family.build(StageSpec(model_path, self.model_cls, self.task, self.config))
        self.runner = Generator(family, self.model_cls, self.task, self.config, encoder, transformer, decoder,
                                info={"model_path": str(model_path)})
        for stage in self.runner.stages:  # the defaults must make a valid request for this model
            stage.check_sampling(self.config.sampling)
        log.info("loaded %s on %s in %.1f s", model_path, self.runner.device, time.perf_counter() - t0)
        return self

    def switch_lora(self, lora_configs: list[dict]) -> None:
        """Replace the LoRAs between requests without reloading the model (needs ``lora_mode: "dynamic"``)."""
        if self.runner is None:
            raise UserError("call create_generator() before switch_lora()")
        switch = getattr(self.runner.transformer, "switch_lora", None)
        if switch is None:
            raise UserError(f"model_cls {self.model_cls!r} does not support switch_lora")
        switch(lora_configs)

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
        if save_result_path is not None:
            _check_output_folder(Path(save_result_path))
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
        """Run one request. Returns the saved path, or ``(path, frames)`` with ``return_result_tensor=True``,
        frames being a float tensor ``[F, H, W, 3]`` in [0, 1]. ``callback(stage, done, total)`` is called after
        every denoising step; setting ``cancel`` (a :class:`CancelToken`) stops the request at the next step with
        :class:`lightx2v.errors.Cancelled`."""
        if self.runner is None:
            raise UserError("call create_generator() before generate()")
        request = self.make_request(seed=seed, prompt=prompt, negative_prompt=negative_prompt, image_path=image_path,
                                    last_frame_path=last_frame_path, save_result_path=save_result_path,
                                    return_result_tensor=return_result_tensor, task=task, target_shape=target_shape,
                                    num_frames=num_frames, **sampling)
        return self.run(request, RunContext(progress=callback, cancel=cancel, show_progress_bar=progress))

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


def _check_output_folder(path: Path) -> None:
    """Create the output folder before the (long) generation, so that a bad path fails at once."""
    folder = path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the output folder {str(folder)!r}: {e.strerror or e}") from None
    if not folder.is_dir():
        raise UserError(f"output folder {str(folder)!r} is not a directory")
