"""Image models behind the generation service, with a test-only text-to-image family (the toy family of
tests/toy_family.py, one frame, ``output="image"``): LightX2V's /v1/tasks/image/, /image/form and /image/sync, OpenAI's
/v1/images/generations (through the openai client), and the video routes refused."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from serve_support import LiveServer, wait_task  # noqa: E402
from toy_family import ToyDecoder, ToyEncoder, ToyTransformer, write_toy_model  # noqa: E402


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from lightx2v.engine.family import ModelFamily, register_family, unregister_family
    from lightx2v.serve.schemas import ServeSettings

    root = tmp_path_factory.mktemp("serve-t2i")
    model = write_toy_model(root / "toy-image")
    family = register_family(ModelFamily(
        name="toy_image",
        model_classes={"toy_t2i": {"t2i": {"infer_steps": 2, "height": 32, "width": 48, "num_frames": 1,
                                           "guidance_scale": 3.0}}},
        build_encoder=lambda spec: ToyEncoder(), build_transformer=lambda spec: ToyTransformer(Path(spec.model_path)),
        build_decoder=lambda spec: ToyDecoder(), tiny_model=lambda task, cls: model, output="image"))
    try:
        s = LiveServer(ServeSettings(model_cls="toy_t2i", task="t2i", data_dir=str(root / "data")))
        yield s
        s.close()
    finally:
        unregister_family(family.name)


@pytest.fixture(scope="module")
def http(server):
    with server.client() as c:
        yield c


def _png(data: bytes):
    from PIL import Image

    img = Image.open(io.BytesIO(data))
    assert img.format == "PNG"
    return img


def test_lightx2v_image_routes(server, http):
    r = http.post("/v1/tasks/image/", json={"prompt": "a red fox", "seed": 3, "save_result_path": "fox.png"})
    assert r.status_code == 200, r.text
    st = wait_task(http, r.json()["task_id"])
    assert st["status"] == "completed" and st["save_result_path"] == "fox.png"
    res = http.get(f"/v1/tasks/{st['task_id']}/result")
    assert res.headers["content-type"] == "image/png" and _png(res.content).size == (48, 32)
    sync = http.post("/v1/tasks/image/sync", json={"prompt": "a red fox", "seed": 3})
    assert sync.status_code == 200 and sync.content == res.content  # same seed and prompt: the same image
    other = http.post("/v1/tasks/image/sync", json={"prompt": "a red fox", "seed": 4, "target_shape": [16, 32]})
    assert _png(other.content).size == (32, 16)
    form = http.post("/v1/tasks/image/form", data={"prompt": "a red fox", "seed": "3"})
    assert wait_task(http, form.json()["task_id"])["status"] == "completed"
    assert http.get(f"/v1/tasks/{form.json()['task_id']}/result").content == res.content
    bad = http.post("/v1/tasks/image/sync", json={"prompt": "x", "target_shape": [17, 32]})
    assert bad.status_code == 422 and "height" in bad.json()["detail"]


def test_openai_images_generations(server, http):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    out = client.images.generate(prompt="a red fox", size="48x32", extra_body={"seed": 3})
    png = base64.b64decode(out.data[0].b64_json)
    assert _png(png).size == (48, 32)
    direct = http.post("/v1/tasks/image/sync", json={"prompt": "a red fox", "seed": 3})
    assert png == direct.content
    r = http.post("/v1/images/generations", json={"prompt": "a red fox", "seed": 3, "response_format": "url"})
    url = r.json()["data"][0]["url"]
    assert http.get(url).content == png
    for body, param in (({"prompt": "a", "n": 2}, "n"), ({"prompt": "a", "size": "wide"}, "size"),
                        ({"prompt": "a", "model": "dall-e-3"}, "model"), ({"size": "32x32"}, "prompt"),
                        ({"prompt": "a", "quality": "hd"}, "quality")):
        r = http.post("/v1/images/generations", json=body)
        assert r.status_code in (404, 422) and param in r.json()["detail"], (body, r.text)


def test_video_routes_are_refused_on_an_image_model(http):
    for path, kw in (("/v1/tasks/video/", {"json": {"prompt": "a"}}), ("/v1/videos", {"json": {"prompt": "a"}})):
        r = http.post(path, **kw)
        assert r.status_code == 400 and "makes images" in r.json()["detail"]
