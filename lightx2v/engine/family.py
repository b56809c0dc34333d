"""Model families as plugins.

A family (Wan today) declares, in its own package (``lightx2v/models/<family>/family.py``), a :class:`ModelFamily`:
its model classes and tasks with their defaults, the config keys only it understands, its built-in tiny models, and
the builders of its three stages. It registers with :func:`register_family`. Nothing outside the family's package
names it: the pipeline, the config layer and the CLI ask this registry. The built-in families are imported on
first use from :data:`BUILTIN_FAMILIES` (one line per family).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from lightx2v.errors import UserError

BUILTIN_FAMILIES = (
    "lightx2v.models.wan.family",
    "lightx2v.models.z_image.family",
    "lightx2v.models.hunyuan_video_15.family",
    "lightx2v.models.qwen_image.family",
)

_FAMILIES: dict[str, "ModelFamily"] = {}
_builtins_loaded = False


@dataclass(frozen=True)
class StageSpec:
    """What a stage builder gets: the checkpoint folder, the model class and task, and the generator config."""

    model_path: Path
    model_cls: str
    task: str
    config: Any  # lightx2v.config.GeneratorConfig


@dataclass(frozen=True)
class ModelFamily:
    name: str
    # model_cls -> task -> defaults (config keys at the "defaults" tier: a config JSON and arguments still win)
    model_classes: Mapping[str, Mapping[str, Mapping[str, Any]]]
    # builders: each loads only its own weights and returns a stage object (lightx2v.engine.runner documents them)
    build_encoder: Callable[[StageSpec], Any]
    build_transformer: Callable[[StageSpec], Any]
    build_decoder: Callable[[StageSpec], Any]
    # the three stages of one process, with the checks across them (e.g. the text width fits the DiT); default:
    # each builder in turn
    build_all: Callable[[StageSpec], tuple[Any, Any, Any]] | None = None
    # the checks build_all makes before any weight is read (the checkpoint's files and headers against the
    # config), on their own: LightX2VPipeline.check_generator
    check: Callable[[StageSpec], None] | None = None
    # a frozen dataclass of the config keys only this family understands (built from those keys), or None
    config_section: type | None = None
    # LightX2V keys whose value is fixed for this family: accepted only with that value
    fixed_keys: Mapping[str, Any] = field(default_factory=dict)
    # the names a LoRA entry's "name" may take (the family's DiTs, e.g. two experts)
    lora_names: tuple[str, ...] = ()
    # (task, model_cls) -> folder of the built-in tiny model (written on first use), and its sampling defaults
    tiny_model: Callable[[str, str], Path] | None = None
    tiny_defaults: Callable[[str, str], Mapping[str, Any]] | None = None
    output: str = "video"  # "video" | "image"
    # checkpoint conversion between public layouts (``lightx2v convert``): does a folder hold this family's
    # checkpoint, and convert(src, dst, layout, quantize) -> dst
    recognizes: Callable[[Path], bool] | None = None
    convert: Callable[[Path, Path, str, str | None], Path] | None = None
    layouts: tuple[str, ...] = ()  # the checkpoint layouts ``convert`` writes
    # model_cls -> {config key: why}: keys LightX2V's runner of that class does not read (e.g. a step list for a
    # model class that samples without one); a config that carries them is accepted, the key dropped with a note
    ignored_keys: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    # (task, image_path, last_frame_path) -> the request's images (RGB PIL images), read and checked; None: the
    # generic rule (image_path for i2v / flf2v, last_frame_path for flf2v)
    read_images: Callable[[str, Any, Any], list] | None = None
    # add(subparsers): the family's own ``lightx2v`` sub-commands (argparse sub-parsers), e.g. ``build-trt``
    cli_commands: Callable[[Any], None] | None = None

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(t for tasks in self.model_classes.values() for t in tasks))

    def config_keys(self) -> frozenset[str]:
        from dataclasses import fields

        own = {f.name for f in fields(self.config_section)} if self.config_section is not None else set()
        return frozenset(own | set(self.fixed_keys))

    def defaults(self, model_cls: str, task: str) -> dict[str, Any]:
        return dict(self.model_classes[model_cls][task])

    def build(self, spec: StageSpec) -> tuple[Any, Any, Any]:
        """The three stages of one process (``build_all``'s checks across them first, where the family has one)."""
        from lightx2v.engine.postprocess import with_postprocessing

        if self.build_all is not None:
            encoder, transformer, decoder = self.build_all(spec)
        else:
            encoder, transformer, decoder = self.build_encoder(spec), self.build_transformer(spec), \
                self.build_decoder(spec)
        return encoder, transformer, with_postprocessing(decoder, spec.config)

    def decoder(self, spec: StageSpec) -> Any:
        """The decoder stage alone (a decoder role), with the generic frame work the config asks for."""
        from lightx2v.engine.postprocess import with_postprocessing

        return with_postprocessing(self.build_decoder(spec), spec.config)


def register_family(family: ModelFamily) -> ModelFamily:
    """Register ``family`` (its model class names must be new)."""
    for other in _FAMILIES.values():
        if other.name == family.name:
            continue
        clash = sorted(set(other.model_classes) & set(family.model_classes))
        if clash:
            raise ValueError(f"model classes {clash} of family {family.name!r} are already registered by "
                             f"{other.name!r}")
    _FAMILIES[family.name] = family
    return family


def unregister_family(name: str) -> None:
    _FAMILIES.pop(name, None)


def _load_builtins() -> None:
    global _builtins_loaded
    if not _builtins_loaded:
        _builtins_loaded = True
        for module in BUILTIN_FAMILIES:
            importlib.import_module(module)


def families() -> dict[str, ModelFamily]:
    _load_builtins()
    return dict(_FAMILIES)


def model_classes() -> dict[str, ModelFamily]:
    """model_cls -> its family, for every registered family."""
    return {cls: fam for fam in families().values() for cls in fam.model_classes}


def all_tasks() -> tuple[str, ...]:
    return tuple(dict.fromkeys(t for fam in families().values() for t in fam.tasks))


def default_model_cls() -> str:
    """The model class used when none is named: the first of the first built-in family (whose built-in tiny model
    is the newcomer's first run)."""
    fams = families()
    first = importlib.import_module(BUILTIN_FAMILIES[0])
    fam = next((f for f in fams.values() if f is getattr(first, "FAMILY", None)), next(iter(fams.values())))
    return next(iter(fam.model_classes))


def convert_layouts() -> tuple[str, ...]:
    return tuple(dict.fromkeys(layout for f in families().values() for layout in f.layouts))


def family_of(model_cls: str) -> ModelFamily:
    classes = model_classes()
    if model_cls not in classes:
        raise UserError(f"unknown model_cls {model_cls!r}; supported: {', '.join(classes)}")
    return classes[model_cls]
