"""``LightX2VPipeline``: the Python API, compatible with LightX2V's.

    pipe = LightX2VPipeline(model_path="/models/Wan2.1-T2V-1.3B", model_cls="wan2.1", task="t2v")
    pipe.create_generator(infer_steps=50, height=480, width=832, num_frames=81, guidance_scale=5.0)
    pipe.generate(seed=42, prompt="a cat", negative_prompt="", save_result_path="out.mp4")

With ``model_path=None`` the built-in tiny model of the task is used (random weights: its output is noise; it exists to
check an installation).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from lightx2v.config import (MODEL_CLASS_DEFAULTS, MODEL_CLASSES, TASKS, GeneratorConfig, build_config,
                              load_config_json)
from lightx2v.errors import UserError

log = logging.getLogger("lightx2v")


class LightX2VPipeline:
    def __init__(self, model_path: str | Path | None = None, model_cls: str = "wan2.1", task: str = "t2v"):
        if model_cls not in MODEL_CLASSES:
            raise UserError(f"unknown model_cls {model_cls!r}; supported: {', '.join(MODEL_CLASSES)}")
        if task not in TASKS:
            raise UserError(f"unknown task {task!r}; supported: {', '.join(TASKS)}")
        if task not in MODEL_CLASS_DEFAULTS[model_cls]:
            raise UserError(f"model_cls {model_cls!r} does not do task {task!r}; it does "
                            f"{', '.join(MODEL_CLASS_DEFAULTS[model_cls])}")
        if model_path is not None and not Path(model_path).exists():
            raise UserError(f"model_path {str(model_path)!r} does not exist")
        self.model_path = None if model_path is None else Path(model_path)
        self.model_cls, self.task = model_cls, task
        self.config: GeneratorConfig | None = None
        self.runner = None

    def create_generator(self, config_json: str | Path | None = None, **overrides: Any) -> "LightX2VPipeline":
        """Build the generator: defaults < ``config_json`` < keyword overrides. Loads the model weights."""
        from lightx2v.models.wan.runner import WanRunner
        from lightx2v.models.wan.tiny import ensure_tiny_model, tiny_defaults

        defaults: dict[str, Any] = dict(MODEL_CLASS_DEFAULTS[self.model_cls][self.task])
        model_path = self.model_path
        if model_path is None:
            defaults.update(tiny_defaults(self.task, self.model_cls))
        json_values = load_config_json(config_json) if config_json is not None else {}
        self.config = build_config(defaults, json_values, overrides)
        if model_path is None:
            model_path = ensure_tiny_model(self.task, self.model_cls)
        t0 = time.perf_counter()
        self.runner = WanRunner(model_path, self.task, self.config, model_cls=self.model_cls)
        log.info("loaded %s (%s layout) on %s in %.1f s", model_path, self.runner.layout, self.runner.device,
                 time.perf_counter() - t0)
        return self

    def switch_lora(self, lora_configs: list[dict]) -> None:
        """Replace the LoRAs between requests without reloading the model (needs ``lora_mode: "dynamic"``)."""
        from lightx2v.hooks.lora import LoRAConfig

        if self.runner is None:
            raise UserError("call create_generator() before switch_lora()")
        if len(self.runner.denoise.experts) > 1:
            raise UserError("switch_lora is not supported yet for two-expert models; create a new generator")
        if self.runner.lora is None or self.runner.lora.mode != "dynamic":
            raise UserError('switch_lora needs LoRAs applied with lora_mode "dynamic" in create_generator()')
        self.runner.lora = self.runner.lora.switch_lora(LoRAConfig.from_lightx2v(lora_configs, mode="dynamic"))

    def check_images(self, image_path, last_frame_path) -> list:
        """Check and read the image inputs the task needs (paths, PIL images or tensors) -> RGB PIL images.
        Callers can do this before any model is loaded, so that a bad image fails at once."""
        if self.task in ("i2v", "flf2v") and image_path is None:
            raise UserError(f"task {self.task!r} needs an image: pass image_path")
        if self.task == "flf2v" and last_frame_path is None:
            raise UserError("task 'flf2v' needs last_frame_path")
        if self.task != "flf2v" and last_frame_path is not None:
            raise UserError(f"task {self.task!r} takes no last_frame_path; use task 'flf2v'")
        if self.task == "t2v" and image_path is not None:
            raise UserError("task 't2v' takes no image_path; use task 'i2v'")
        from lightx2v.io.image import load_image

        images = [load_image(image_path, "image_path")] if image_path is not None else []
        if last_frame_path is not None:
            images.append(load_image(last_frame_path, "last_frame_path"))
        return images

    def generate(self, seed: int = 42, prompt: str = "", negative_prompt: str = "", image_path: str | None = None,
                 last_frame_path: str | None = None, save_result_path: str | Path | None = None,
                 return_result_tensor: bool = False, progress: bool = True):
        """Run one request. Returns the saved path, or ``(path, frames)`` with ``return_result_tensor=True``,
        frames being a float tensor ``[F, H, W, 3]`` in [0, 1]."""
        from lightx2v.io.video import save_result

        if self.runner is None:
            raise UserError("call create_generator() before generate()")
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
            raise UserError(f"seed={seed!r} must be an integer in [0, 2**63)")
        if not isinstance(prompt, str) or not isinstance(negative_prompt, str):
            raise UserError("prompt and negative_prompt must be strings")
        images = self.check_images(image_path, last_frame_path)
        if save_result_path is None and not return_result_tensor:
            raise UserError("nothing to do: pass save_result_path and/or return_result_tensor=True")
        if save_result_path is not None:
            _check_output_folder(Path(save_result_path))

        frames, timings = self.runner.run(prompt, negative_prompt, seed, images=images, progress=progress)
        saved = None
        if save_result_path is not None:
            t0 = time.perf_counter()
            saved = save_result(frames.frames, save_result_path, frames.fps)
            timings["save"] = time.perf_counter() - t0
        log.info(" | ".join(f"{k} {v:.2f} s" for k, v in timings.items()))
        self.last_timings = timings
        if return_result_tensor:
            return saved, frames.frames
        return saved


def _check_output_folder(path: Path) -> None:
    """Create the output folder before the (long) generation, so that a bad path fails at once."""
    folder = path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the output folder {str(folder)!r}: {e.strerror or e}") from None
    if not folder.is_dir():
        raise UserError(f"output folder {str(folder)!r} is not a directory")


