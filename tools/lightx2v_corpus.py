#!/usr/bin/env python3
"""Extract LightX2V's Wan configs, Wan examples and pipeline API into test data (facts only, written by us).

Reads a clone of ModelTC/LightX2V (bare or not) through ``git show`` at one commit and writes:

* ``tests/data/lightx2v_wan_configs.json``: ``{relative path: {key: value}}`` for every Wan config in ``configs/``;
* ``tests/data/lightx2v_wan_config_classes.json``: ``{relative path: {"model_cls": [...], "tasks": [...],
  "how": ...}}``, the model classes / tasks the repository runs each Wan config with, and by which rule it was
  counted as Wan (see :func:`classify`);
* ``tests/data/lightx2v_wan_examples.json``: the call sequence of each Wan example (constructor kwargs, builder
  methods with their kwargs, ``create_generator`` / ``generate`` kwargs, attribute assignments), in order;
* ``tests/data/lightx2v_api.json``: the signatures (parameter names and default values) of
  ``LightX2VPipeline.__init__``, ``create_generator``, ``generate``, ``enable_*``, ``switch_lora`` and the
  keys that ``create_generator``'s keyword path (``set_infer_config``) assigns.

Which configs are Wan (:func:`classify`), first rule that decides:

1. the config's own ``model_cls`` key;
2. the ``--model_cls`` / ``model_cls=`` given beside the config's path in the repository's scripts/, examples/,
   docs/, tools/, app/ and lightx2v/ files (one invocation = the text between two ``python -m``/``torchrun``/
   ``LightX2VPipeline(`` starts; ``$var`` resolved from ``var=...`` lines of the same file);
3. ``configs/bench/``: LightX2V's benchmark page (docs/*/getting_started/benchmark_source.md) runs these on
   Wan2.1-I2V-14B-480P, so they are ``wan2.1`` i2v;
4. otherwise the file name: Wan when it contains ``wan`` (``wan_*.json``, ``wan22_*.json``), else not.

A model class is Wan when it starts with ``wan`` (wan2.1, wan2.1_distill, wan2.2_moe, wan2.2, ... and the Wan
derivatives LightX2V registers under wan* names: vace, animate, s2v, sf, causvid, matrix-game, dancer). Models
that LightX2V builds on Wan but registers under their own names (seko_talk, infinitetalk, lingbot_*) are not
counted.

Usage: ``python tools/lightx2v_corpus.py [--repo DIR] [--commit SHA] [--seed FILE] [--out tests/data]``.
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import subprocess
from collections import defaultdict
from pathlib import Path

DEFAULT_REPO = "/work/.mirror/ModelTC+LightX2V/repo"
DEFAULT_COMMIT = "f8aee98"
REF_FOLDERS = ("scripts", "examples", "docs", "tools", "app", "lightx2v")
REF_SUFFIXES = (".sh", ".py", ".md", ".bat", ".ps1")


class Repo:
    def __init__(self, path: str, commit: str):
        self.path, self.commit = path, commit

    def files(self, folder: str) -> list[str]:
        out = subprocess.run(["git", "-C", self.path, "ls-tree", "-r", "--name-only", self.commit, folder],
                             capture_output=True, text=True, check=True).stdout
        return out.split()

    def text(self, path: str) -> str:
        return subprocess.run(["git", "-C", self.path, "show", f"{self.commit}:{path}"],
                              capture_output=True, text=True, check=True).stdout

    def full_commit(self) -> str:
        return subprocess.run(["git", "-C", self.path, "rev-parse", self.commit], capture_output=True, text=True,
                              check=True).stdout.strip()


# --- configs -------------------------------------------------------------------------------------------------

_INVOCATION = re.compile(r"(?:python[0-9.]*\s+-m|torchrun|python[0-9.]*\s+\S+\.py|LightX2VPipeline\()")
_CONFIG_PATH = re.compile(r"configs/[\w./-]+\.json")
_MODEL_CLS = re.compile(r"model_cls[\s=:]+[\"']?([\w.${}-]+)")
_TASK = re.compile(r"--task[\s=]+[\"']?([\w.${}-]+)|task\s*=\s*[\"']([\w-]+)[\"']")
_VAR = re.compile(r"^\s*(?:export\s+)?(\w+)=[\"']?([^\s\"']+)", re.M)


def script_references(repo: Repo) -> dict[str, dict[str, set]]:
    """config path -> {"model_cls": {...}, "tasks": {...}} from the repository's own invocations."""
    refs: dict[str, dict[str, set]] = defaultdict(lambda: {"model_cls": set(), "tasks": set()})
    for folder in REF_FOLDERS:
        for f in repo.files(folder):
            if not f.endswith(REF_SUFFIXES):
                continue
            text = repo.text(f)
            variables = dict(_VAR.findall(text))
            for segment in _INVOCATION.split(text):
                paths = _CONFIG_PATH.findall(segment)
                if not paths:
                    continue
                found = _MODEL_CLS.search(segment)
                cls = found.group(1) if found else None
                if cls and cls.startswith("$"):
                    cls = variables.get(cls.strip("${}"))
                tasks = set()
                for a, b in _TASK.findall(segment):
                    t = a or b
                    t = variables.get(t.strip("${}")) if t.startswith("$") else t
                    if t:
                        tasks.add(t)
                for p in paths:
                    if cls and cls not in ("model_cls", "None") and not cls.startswith("$"):
                        refs[p]["model_cls"].add(cls)
                    refs[p]["tasks"] |= tasks
    return refs


def is_wan_class(model_cls: str) -> bool:
    return model_cls.startswith("wan")


def classify(path: str, cfg: dict, refs: dict) -> tuple[bool, list[str], str]:
    """(is Wan, model classes, the rule that decided) for one config; see the module docstring."""
    own = cfg.get("model_cls")
    if isinstance(own, str) and own:
        return is_wan_class(own), [own], "own model_cls key"
    classes = sorted(refs.get(path, {}).get("model_cls", ()))
    if classes:
        return all(is_wan_class(c) for c in classes), classes, "model_cls of the repository's invocations"
    if path.startswith("configs/bench/"):
        return True, ["wan2.1"], "benchmark page (Wan2.1-I2V-14B-480P)"
    name = path.rsplit("/", 1)[-1].lower()
    return "wan" in name, [], "file name"


def extract_configs(repo: Repo) -> tuple[dict, dict, dict]:
    refs = script_references(repo)
    configs, classes, skipped = {}, {}, {}
    for path in repo.files("configs"):
        if not path.endswith(".json"):
            continue
        try:
            cfg = json.loads(repo.text(path))
        except json.JSONDecodeError as e:
            skipped[path] = f"not valid JSON ({e.msg} at line {e.lineno})"
            continue
        if not isinstance(cfg, dict):
            skipped[path] = f"a JSON {type(cfg).__name__}, not a config object"
            continue
        wan, model_cls, how = classify(path, cfg, refs)
        if wan:
            configs[path] = cfg
            tasks = sorted(refs.get(path, {}).get("tasks", ()))
            if isinstance(cfg.get("task"), str):
                tasks = sorted(set(tasks) | {cfg["task"]})
            classes[path] = {"model_cls": model_cls, "tasks": tasks, "how": how}
    return configs, classes, skipped


# --- examples ------------------------------------------------------------------------------------------------


def _value(node: ast.AST, names: dict):
    """A literal (or a module-level name bound to one); other expressions as {"expr": source}."""
    if isinstance(node, ast.Name) and node.id in names:
        return names[node.id]
    try:
        return ast.literal_eval(node)
    except ValueError:
        return {"expr": ast.unparse(node)}


def example_calls(source: str) -> dict:
    """The pipeline's construction and the calls on it, in source order (comments are not code: skipped)."""
    tree = ast.parse(source)
    names: dict = {}
    pipe_name, steps = None, []
    for stmt in tree.body:
        if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1:
            target, value = stmt.targets[0], stmt.value
            if isinstance(value, ast.Call) and getattr(value.func, "id", None) == "LightX2VPipeline":
                pipe_name = target.id
                steps.append({"call": "LightX2VPipeline",
                              "kwargs": {k.arg: _value(k.value, names) for k in value.keywords}})
                continue
            if isinstance(target, ast.Name):
                try:
                    names[target.id] = ast.literal_eval(value)
                except ValueError:
                    pass
                continue
            if isinstance(target, ast.Attribute) and getattr(target.value, "id", None) == pipe_name:
                steps.append({"set_attribute": target.attr, "value": _value(value, names)})
                continue
        call = stmt.value if isinstance(stmt, ast.Expr) else getattr(stmt, "value", None)
        if isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute) \
                and getattr(call.func.value, "id", None) == pipe_name:
            step = {"call": call.func.attr, "kwargs": {k.arg: _value(k.value, names) for k in call.keywords}}
            if call.args:
                step["args"] = [_value(a, names) for a in call.args]
            steps.append(step)
    return {"steps": steps}


# The two Intel XPU usage examples of this project's seed (LightX2V PR descriptions, not files of the
# repository), written out as their call sequences. Source: shared/seeds/000_*.txt ("Usage" of the Intel XPU
# platform PR, and the usage example of ModelTC#918).
SEED_EXAMPLES = {
    "seed:intel_xpu_wan_t2v_usage": {"steps": [
        {"call": "LightX2VPipeline", "kwargs": {"model_path": "xxx\\models\\Wan2.1-T2V-1.3B", "model_cls": "wan2.1",
                                                "task": "t2v"}},
        {"call": "create_generator", "kwargs": {"config_json": "../../configs/platforms/intel_xpu/wan_t2v_1_3.json"}},
        {"call": "create_generator", "kwargs": {"attn_mode": "torch_sdpa", "infer_steps": 50, "height": 480,
                                                "width": 832, "num_frames": 33, "guidance_scale": 5.0,
                                                "sample_shift": 5.0}},
        {"call": "generate", "kwargs": {"seed": 42, "prompt": "a cat", "negative_prompt": {"expr": "negative_prompt"},
                                        "save_result_path": "./output.mp4"}},
    ]},
    "seed:intel_xpu_wan_t2v_flash_attn_usage": {"steps": [
        {"call": "LightX2VPipeline", "kwargs": {"model_path": "xxxx\\Wan2.1-T2V-1.3B", "model_cls": "wan2.1",
                                                "task": "t2v"}},
        {"call": "create_generator",
         "kwargs": {"config_json": "xxx\\LightX2V\\configs\\platforms\\intel_xpu\\wan_t2v_1_3_xpu_flash_attn.json"}},
        {"call": "generate", "kwargs": {"seed": 42, "prompt": "a bird", "negative_prompt": {"expr": "negative_prompt"},
                                        "save_result_path": "./output.mp4"}},
    ]},
}


def extract_examples(repo: Repo) -> dict:
    out = {}
    for path in repo.files("examples/wan"):
        if path.endswith(".py"):
            out[path] = example_calls(repo.text(path))
    out.update(SEED_EXAMPLES)
    return out


# --- API signatures ------------------------------------------------------------------------------------------

API_METHODS = ("__init__", "create_generator", "generate", "switch_lora", "set_infer_config")


def _signature(fn: ast.FunctionDef) -> list[dict]:
    args = fn.args.args[1:]  # without self
    defaults = [None] * (len(args) - len(fn.args.defaults)) + list(fn.args.defaults)
    params = []
    for a, d in zip(args, defaults):
        p = {"name": a.arg}
        if d is not None:
            p["default"] = _value(d, {})
        params.append(p)
    return params


def _assigned_attributes(fn: ast.FunctionDef) -> list[str]:
    """``self.X = ...`` targets in a method (the config keys it sets), in order, once each."""
    seen = []
    for node in ast.walk(fn):
        if isinstance(node, ast.Assign):
            for t in node.targets:
                if isinstance(t, ast.Attribute) and getattr(t.value, "id", None) == "self" and t.attr not in seen:
                    seen.append(t.attr)
    return seen


def extract_api(repo: Repo) -> dict:
    tree = ast.parse(repo.text("lightx2v/pipeline.py"))
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "LightX2VPipeline")
    out = {}
    for fn in cls.body:
        if isinstance(fn, ast.FunctionDef) and (fn.name in API_METHODS or fn.name.startswith("enable_")):
            out[fn.name] = {"params": _signature(fn), "sets": _assigned_attributes(fn)}
    return out


# --- main ----------------------------------------------------------------------------------------------------


def _write(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=1, sort_keys=True, ensure_ascii=False) + "\n")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repo", default=DEFAULT_REPO)
    ap.add_argument("--commit", default=DEFAULT_COMMIT)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "tests" / "data"))
    a = ap.parse_args(argv)
    repo = Repo(a.repo, a.commit)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    configs, classes, skipped = extract_configs(repo)
    source = {"repository": "ModelTC/LightX2V", "commit": repo.full_commit()}
    _write(out / "lightx2v_wan_configs.json", configs)
    _write(out / "lightx2v_wan_config_classes.json", {"_source": source, "_skipped": skipped, **classes})
    _write(out / "lightx2v_wan_examples.json", {"_source": source, **extract_examples(repo)})
    _write(out / "lightx2v_api.json", {"_source": source, **extract_api(repo)})
    print(f"{len(configs)} Wan configs, {len(skipped)} files skipped; examples and API written to {out}")


if __name__ == "__main__":
    main()
