"""The package's layers: no import runs back up them, and the shared top layer names no model family.

    errors, validate, loading, io        the base (io: reading and writing images and videos)
    ops, schedulers                      kernels and samplers
    models/<family> (math, checkpoints)  plain PyTorch models; models/plan.py, models/block_stack.py and
                                         models/rife (frame interpolation) are shared by every family
    hooks                                runtime features, reading a model's hook plan (no family's code)
    engine                               requests, messages, progress, the family registry, the runner
    models/<family>/{family,stages,convert}.py   a family's wiring: its stages and its registration
    config, pipeline, cli, convert       the top (families only through the registry)
"""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "lightx2v"
WIRING = {"family.py", "stages.py", "convert.py"}  # a family's wiring (stages.py: when it uses the engine)


def _imports(path: Path) -> set[str]:
    """Every lightx2v module a file imports, at the top or inside functions."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lightx2v"):
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("lightx2v"))
    return out


def _layer(module: str) -> str:
    parts = module.split(".")[1:] or [""]
    head = parts[0]
    if head in ("errors", "validate", "loading", "io"):
        return "base"
    if head in ("ops", "schedulers"):
        return "ops"
    if head == "models":
        if (len(parts) <= 2 and parts[-1] in ("plan", "block_stack", "models")) or parts[1:2] == ["rife"]:
            return "shared-model"  # what every family uses (hook plans, the block stack, frame interpolation)
        if parts[-1] in {w.removesuffix(".py") for w in WIRING} and module in _wiring_modules():
            return "wiring"
        return "model"
    if head == "hooks":
        return "hooks"
    if head == "engine":
        return "engine"
    return "top"


ALLOWED = {  # layer -> layers it may import
    "base": {"base"},
    "ops": {"base", "ops", "shared-model"},
    "shared-model": {"base", "shared-model"},
    "model": {"base", "ops", "shared-model", "model"},
    "hooks": {"base", "ops", "shared-model", "hooks"},
    "engine": {"base", "ops", "shared-model", "engine"},
    "wiring": {"base", "ops", "shared-model", "model", "hooks", "engine", "wiring"},
    "top": {"base", "ops", "shared-model", "hooks", "engine", "top"},
}


def _wiring_modules() -> set[str]:
    """family.py and convert.py of every family, and a stages.py that builds on the engine (Wan's); a stages.py of
    plain stage classes (Z-Image's, HunyuanVideo's) is model code like the rest of the family."""
    out = set()
    for path in PKG.glob("models/*/*.py"):
        if path.name in WIRING and (path.name != "stages.py"
                                    or any(m.startswith(("lightx2v.engine", "lightx2v.hooks")) for m in _imports(path))):
            out.add(_module_of(path))
    return out


def _module_of(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def test_no_import_runs_back_up_the_layers():
    bad = []
    for path in sorted(PKG.rglob("*.py")):
        mod = _module_of(path)
        mine = _layer(mod)
        for imported in _imports(path):
            if imported == "lightx2v":
                continue
            theirs = _layer(imported)
            if theirs not in ALLOWED[mine]:
                bad.append(f"{mod} ({mine}) imports {imported} ({theirs})")
    assert not bad, "\n".join(bad)


def test_the_rules_catch_a_violation():
    # the check above can fail: a hook importing a family's model, the engine importing a hook
    assert _layer("lightx2v.models.wan.dit") not in ALLOWED["hooks"]
    assert _layer("lightx2v.hooks.lora") not in ALLOWED["engine"]
    assert _layer("lightx2v.models.wan.family") not in ALLOWED["top"]
    assert _layer("lightx2v.config") not in ALLOWED["model"]


def test_the_top_layer_names_no_family():
    for name in ("pipeline.py", "config.py", "cli.py", "convert.py", "infer.py", "__init__.py"):
        tree = ast.parse((PKG / name).read_text())
        strings = [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)]
        docs = {ast.get_docstring(n, clean=False) for n in ast.walk(tree)
                if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))}
        code_strings = [s for s in strings if s not in docs]
        assert not [s for s in code_strings if "wan" in s.lower()], name
