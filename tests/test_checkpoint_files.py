"""Damaged .safetensors files: every reader names the file and says it is corrupt or incomplete."""

import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from lightx2v import LightX2VPipeline
from lightx2v.errors import CheckpointError
from lightx2v.loading import iter_safetensors, read_safetensors_dir
from lightx2v.models.wan.checkpoint import WAN_DIT_WEIGHTS, dit_lazy_tensors, read_dit_config, single_file_dit_tensors
from lightx2v.models.wan.tiny import ensure_tiny_model

MESSAGE = "not a readable safetensors file, it is corrupt or incomplete"


def _damage(path, how: str) -> None:
    raw = path.read_bytes()
    if how == "truncated":  # a download cut short: the header promises more data than the file holds
        path.write_bytes(raw[: len(raw) // 2])
    else:  # garbage: bytes that are no safetensors header at all
        path.write_bytes(os.urandom(4096))


@pytest.fixture(params=["truncated", "garbage"])
def damaged(request, tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"blocks.0.ffn.0.weight": torch.randn(64, 32), "head.head.bias": torch.randn(8)}, str(path))
    _damage(path, request.param)
    return path


def test_file_readers_name_the_damaged_file(damaged):
    for read in (lambda: list(iter_safetensors([damaged])), lambda: list(single_file_dit_tensors(damaged)),
                 lambda: dit_lazy_tensors(weights_file=damaged)):
        with pytest.raises(CheckpointError) as e:
            read()
        assert str(damaged) in str(e.value) and MESSAGE in str(e.value)
    folder = damaged.parent
    damaged.rename(folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=MESSAGE) as e:
        read_safetensors_dir(folder, "text encoder")
    assert str(folder / "model.safetensors") in str(e.value)


@pytest.fixture(scope="module")
def tiny_copy(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny") / "model"
    shutil.copytree(ensure_tiny_model(), root)
    return root


@pytest.mark.parametrize("how", ["truncated", "garbage"])
def test_model_folder_with_a_damaged_dit(tiny_copy, tmp_path, how):
    root = tmp_path / "model"
    shutil.copytree(tiny_copy, root)
    dit = root / f"{WAN_DIT_WEIGHTS}.safetensors"
    _damage(dit, how)
    with pytest.raises(CheckpointError, match=MESSAGE) as e:
        dit_lazy_tensors(root, "wan")  # the lazy-load reader
    assert str(dit) in str(e.value)
    with pytest.raises(CheckpointError, match=MESSAGE):
        LightX2VPipeline(model_path=str(root)).create_generator(height=32, width=32, num_frames=5, infer_steps=1)
    if how != "truncated":
        return
    # the CLI: one line naming the file, exit status 2, no traceback
    r = subprocess.run([sys.executable, "-m", "lightx2v.cli", "generate", "--model_path", str(root), "--prompt", "x",
                        "--save_result_path", str(tmp_path / "o.mp4"), "--height", "32", "--width", "32",
                        "--num_frames", "5", "--infer_steps", "1"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    assert str(dit) in r.stderr and MESSAGE in r.stderr and "Traceback" not in r.stderr


def test_intact_copy_still_reads(tiny_copy):
    assert read_dit_config(tiny_copy, "wan").num_layers >= 1
    assert len(list(dit_lazy_tensors(tiny_copy, "wan").keys())) > 0
