"""The CLI and the API on the built-in tiny model, and their answers to bad input."""

import json
import subprocess
import sys

import pytest
import torch

from lightx2v import LightX2VPipeline
from lightx2v.errors import UserError
from lightx2v.io.video import read_video

SMALL = ["--height", "32", "--width", "48", "--num_frames", "5", "--infer_steps", "3", "--no_progress"]


def cli(*args, module="lightx2v.cli"):
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=600)


def test_default_command_on_tiny_model(tmp_path):
    out = tmp_path / "out.mp4"
    r = cli("generate", "--prompt", "a cat", "--save_result_path", str(out))
    assert r.returncode == 0, r.stderr
    video = read_video(out)
    assert video.shape == (17, 128, 128, 3)  # the tiny model's defaults
    assert "denoise" in r.stderr and "VAE decode" in r.stderr and "save" in r.stderr  # timing summary


def test_infer_alias_and_overrides(tmp_path):
    out = tmp_path / "a" / "b.mp4"
    r = cli("--prompt", "a dog", "--save_result_path", str(out), *SMALL, module="lightx2v.infer")
    assert r.returncode == 0, r.stderr
    assert read_video(out).shape == (5, 32, 48, 3)


def test_single_frame_saves_png(tmp_path):
    r = cli("generate", "--prompt", "x", "--save_result_path", str(tmp_path / "one.mp4"), *SMALL[:-5],
            "--num_frames", "1", "--infer_steps", "2")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "one.png").is_file()


def test_config_json_and_override_precedence(tmp_path):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"target_height": 48, "target_width": 32, "target_video_length": 5, "infer_steps": 2,
                               "self_attn_1_type": "torch_sdpa", "cpu_offload": False}))
    pipe = LightX2VPipeline()  # tiny model
    pipe.create_generator(config_json=str(cfg), width=64)
    s = pipe.config.sampling
    assert (s.height, s.width, s.num_frames, s.infer_steps) == (48, 64, 5, 2)
    frames = pipe.generate(seed=1, prompt="a cat", return_result_tensor=True, progress=False)["video"]
    assert frames.shape == (5, 48, 64, 3) and frames.min() >= 0 and frames.max() <= 1
    # same seed, same video; another seed or prompt, another video
    again = pipe.generate(seed=1, prompt="a cat", return_result_tensor=True, progress=False)["video"]
    other_seed = pipe.generate(seed=2, prompt="a cat", return_result_tensor=True, progress=False)["video"]
    other_prompt = pipe.generate(seed=1, prompt="ocean waves at night", return_result_tensor=True, progress=False)["video"]
    assert torch.equal(frames, again)
    assert (frames - other_seed).abs().max() > 0.05
    assert (frames - other_prompt).abs().max() > 0.05


BAD = [
    (["--model_path", "/nonexistent/model"], "/nonexistent/model"),
    (["--model_cls", "wan9"], "unknown model_cls 'wan9'"),
    (["--task", "t3v"], "unknown task 't3v'"),
    (["--height", "100"], "height=100 is not divisible by 16"),
    (["--num_frames", "80"], "num_frames=80 is not of the form 4k+1"),
    (["--infer_steps", "0"], "infer_steps=0 must be an integer >= 1"),
    (["--task", "i2v"], "needs an image"),
    (["--attn_mode", "magic"], "'magic' is not an available attention backend"),
    (["--sample_solver", "ddim"], "sample_solver='ddim' is not supported"),
]


@pytest.mark.parametrize("extra,message", BAD)
def test_bad_input_one_line_exit_2(tmp_path, extra, message):
    r = cli("generate", "--prompt", "x", "--save_result_path", str(tmp_path / "o.mp4"), *SMALL, *extra)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], r.stderr
    assert "Traceback" not in r.stderr


def test_bad_config_keys_and_files(tmp_path):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"infer_step": 3, "target_heigth": 480}))
    r = cli("generate", "--config_json", str(cfg), "--save_result_path", str(tmp_path / "o.mp4"))
    assert r.returncode == 2 and "'infer_step' (did you mean 'infer_steps'" in r.stderr
    assert "'target_heigth' (did you mean 'target_height'" in r.stderr
    cfg.write_text(json.dumps({"parallel": {"seq_p_size": 2}}))  # a LightX2V feature this version lacks
    r = cli("generate", "--config_json", str(cfg), "--save_result_path", str(tmp_path / "o.mp4"))
    assert r.returncode == 2 and "LightX2V key `parallel` (feature: multi-GPU" in r.stderr
    assert "is not implemented in lightx2v" in r.stderr and "did you mean" not in r.stderr
    # output folder that cannot be created (a file stands where a folder should be)
    (tmp_path / "file").write_text("x")
    r = cli("generate", "--save_result_path", str(tmp_path / "file" / "sub" / "o.mp4"), *SMALL)
    assert r.returncode == 2 and "cannot create the output folder" in r.stderr


def test_missing_checkpoint_file_is_named(tmp_path):
    from lightx2v.models.wan.tiny import ensure_tiny_model
    import shutil

    model = tmp_path / "model"
    shutil.copytree(ensure_tiny_model(), model)
    (model / "Wan2.1_VAE.pth").unlink()
    r = cli("generate", "--model_path", str(model), "--save_result_path", str(tmp_path / "o.mp4"), *SMALL)
    assert r.returncode == 2 and "Wan2.1_VAE.pth" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_api_errors():
    with pytest.raises(UserError, match="call create_generator"):
        LightX2VPipeline().generate(prompt="x", save_result_path="x.mp4")
    pipe = LightX2VPipeline().create_generator(height=32, width=32, num_frames=1, infer_steps=1)
    with pytest.raises(UserError, match="seed"):
        pipe.generate(seed=-1, prompt="x", return_result_tensor=True)
    with pytest.raises(UserError, match="nothing to do"):
        pipe.generate(prompt="x")


def test_shipped_configs_are_valid():
    from pathlib import Path

    from lightx2v.config import build_config, load_config_json

    from lightx2v.engine.family import families

    fams = families()
    for path in sorted(Path(__file__).resolve().parents[1].glob("configs/**/*.json")):
        # the family each config is for
        by_folder = {"hunyuan_video_15": "hunyuan_video_1.5", "qwen_image": "qwen_image"}
        family = fams["z_image"] if "z_image" in path.name else fams[by_folder.get(path.parent.name, "wan")]
        values = load_config_json(path)
        for key, error in (("lora_configs", "LoRA file .* does not exist"),
                           ("dit_original_ckpt", "dit_original_ckpt .* does not exist")):
            if key in values:  # example paths: check the rest of the file, and that the path is the problem
                with pytest.raises(UserError, match=error):
                    build_config({}, values, {}, family=family)
                values.pop(key)
        build_config({}, values, {}, family=family)


def test_i2v_and_flf2v_on_tiny_models(tmp_path):
    from PIL import Image

    img = tmp_path / "cat.png"
    Image.new("RGB", (60, 40), (10, 200, 30)).save(img)
    out = tmp_path / "i2v.mp4"
    r = cli("generate", "--task", "i2v", "--image_path", str(img), "--prompt", "x", "--save_result_path", str(out),
            *SMALL)
    assert r.returncode == 0, r.stderr
    assert read_video(out).shape == (5, 32, 48, 3) and "image encode" in r.stderr
    last = tmp_path / "last.jpg"
    Image.new("RGB", (60, 40), (200, 10, 30)).save(last)
    r = cli("generate", "--task", "flf2v", "--image_path", str(img), "--last_frame_path", str(last), "--prompt", "x",
            "--save_result_path", str(tmp_path / "flf.mp4"), *SMALL)
    assert r.returncode == 0, r.stderr


def test_bad_images_rejected(tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_text("not an image")
    for extra, msg in ((["--image_path", str(bad)], "cannot read image_path"),
                       (["--image_path", str(tmp_path / "none.png")], "does not exist"),
                       ([], "needs an image")):
        r = cli("generate", "--task", "i2v", *extra, "--save_result_path", str(tmp_path / "o.mp4"), *SMALL)
        assert r.returncode == 2 and msg in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    r = cli("generate", "--task", "flf2v", "--image_path", str(bad), "--save_result_path", str(tmp_path / "o.mp4"),
            *SMALL)
    assert r.returncode == 2 and "last_frame_path" in r.stderr


def test_malformed_dit_config_is_one_line(tmp_path):
    import shutil

    from lightx2v.models.wan.tiny import ensure_tiny_model

    model = tmp_path / "model"
    shutil.copytree(ensure_tiny_model(), model)
    (model / "config.json").write_text("{not json")
    r = cli("generate", "--model_path", str(model), "--save_result_path", str(tmp_path / "o.mp4"), *SMALL)
    assert r.returncode == 2 and "not valid JSON" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
