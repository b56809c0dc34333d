"""Image inputs of the generation service (tiny Wan2.1 I2V model): base64, data URLs, files of the allow-listed
input folder, multipart uploads (LightX2V's form route, OpenAI's input_reference), and what is refused: URLs, paths
out of the folder, bad base64, a text file as an image, an oversize upload."""

from __future__ import annotations

import base64

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

from serve_support import TINY, LiveServer, decode_video, png_bytes, wait_task  # noqa: E402


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from lightx2v.serve.schemas import ServeSettings

    root = tmp_path_factory.mktemp("serve-i2v")
    inputs = root / "inputs"
    (inputs / "sub").mkdir(parents=True)
    (inputs / "cat.png").write_bytes(png_bytes((64, 48), (10, 200, 30)))
    (inputs / "sub" / "dog.png").write_bytes(png_bytes((40, 40), (200, 10, 90)))
    (inputs / "notes.txt").write_text("hello")
    (root / "secret.png").write_bytes(png_bytes())
    (inputs / "link.png").symlink_to(root / "secret.png")
    s = LiveServer(ServeSettings(task="i2v", data_dir=str(root / "data"), input_dir=str(inputs),
                                 max_upload_mb=0.5, max_batch_size=2))
    s.root = root
    yield s
    s.close()


@pytest.fixture(scope="module")
def http(server):
    with server.client() as c:
        yield c


def post(http, **fields):
    return http.post("/v1/tasks/video/", json={"prompt": "a cat", "seed": 1, "infer_steps": 1, **TINY, **fields})


def test_images_as_base64_data_url_and_input_folder_files(server, http, tmp_path):
    png = png_bytes((64, 48), (10, 200, 30))
    ids = {
        "base64": post(http, image_path=base64.b64encode(png).decode()),
        "data URL": post(http, image_path="data:image/png;base64," + base64.b64encode(png).decode()),
        "input file": post(http, image_path="cat.png"),
        "input sub-folder": post(http, image_path="sub/dog.png"),
    }
    for name, r in ids.items():
        assert r.status_code == 200, (name, r.text)
    results = {}
    for name, r in ids.items():
        st = wait_task(http, r.json()["task_id"])
        assert st["status"] == "completed", (name, st)
        results[name] = decode_video(http.get(f"/v1/tasks/{st['task_id']}/result").content, tmp_path)
    # the same image by three routes gives the same video; another image a different one
    assert (results["base64"] - results["data URL"]).abs().max().item() == 0
    assert (results["base64"] - results["input file"]).abs().max().item() <= 2 / 255
    assert (results["input file"] - results["input sub-folder"]).abs().mean().item() > 5 / 255
    # base64 images are kept once, by content
    assert len(list((server.root / "data" / "inputs").glob("*.png"))) == 1


def test_uploads_through_the_form_route_and_openai_input_reference(server, http, tmp_path):
    r = http.post("/v1/tasks/video/form", files={"image_file": ("cat.png", png_bytes((64, 48)), "image/png")},
                  data={"prompt": "a cat", "seed": "3", "infer_steps": "1", "target_shape": "[32, 32]",
                        "target_video_length": "5"})
    assert r.status_code == 200, r.text
    st = wait_task(http, r.json()["task_id"])
    assert st["status"] == "completed"
    assert tuple(decode_video(http.get(f"/v1/tasks/{st['task_id']}/result").content, tmp_path).shape) == (5, 32, 32, 3)
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    if not hasattr(client, "videos"):
        pytest.skip("this openai client has no videos API")
    video = client.videos.create_and_poll(prompt="a cat", size="32x32", seconds="0.25",
                                          input_reference=("ref.png", png_bytes((50, 50)), "image/png"),
                                          extra_body={"infer_steps": 1, "seed": 4})
    assert video.status == "completed" and wait_task(http, video.id)["status"] == "completed"
    r = http.post("/v1/videos", json={"prompt": "a", "size": "32x32", "seconds": 0.25, "infer_steps": 1,
                                      "input_reference": {"image_url": "data:image/png;base64,"
                                                          + base64.b64encode(png_bytes()).decode()}})
    assert r.status_code == 200 and wait_task(http, r.json()["id"])["status"] == "completed"


BAD = [  # (name, json fields or multipart, status, field named)
    ("no image for i2v", {}, 422, "image_path"),
    ("URL", {"image_path": "https://example.com/cat.png"}, 400, "image_path"),
    ("file URL", {"image_path": "file:///etc/passwd"}, 400, "image_path"),
    ("traversal", {"image_path": "../secret.png"}, 403, "image_path"),
    ("deep traversal", {"image_path": "sub/../../secret.png"}, 403, "image_path"),
    ("absolute path", {"image_path": "/etc/hostname"}, 403, "image_path"),
    ("symlink out of the folder", {"image_path": "link.png"}, 403, "image_path"),
    ("missing file", {"image_path": "nope.png"}, 422, "image_path"),
    ("text file in the folder", {"image_path": "notes.txt"}, 422, "image_path"),
    ("text file as base64", {"image_path": base64.b64encode(b"just some text, not an image" * 20).decode()}, 422,
     "image_path"),
    ("bad base64", {"image_path": "data:image/png;base64,###"}, 422, "image_path"),
    ("long garbage", {"image_path": "@" * 2000}, 422, "image_path"),
    ("truncated PNG", {"image_path": base64.b64encode(png_bytes()[:60]).decode()}, 422, "image_path"),
    ("last frame on i2v", {"image_path": "cat.png", "last_frame_path": "cat.png"}, 422, "last_frame_path"),
    ("image not a string", {"image_path": 12}, 422, "image_path"),
]


def test_bad_image_inputs(server, http):
    before = http.get("/v1/service/status").json()["total_tasks"]
    for name, fields, status, param in BAD:
        r = post(http, **fields)
        assert r.status_code == status, (name, r.status_code, r.text[:300])
        assert param in r.json()["detail"], (name, r.json()["detail"])
    r = http.post("/v1/tasks/video/form", files={"image_file": ("a.png", b"hello, not a png")},
                  data={"prompt": "a", **{k: str(v) for k, v in TINY.items()}})
    assert r.status_code == 422 and "image_file" in r.json()["detail"]
    r = http.post("/v1/tasks/video/form", files={"image_file": ("a.png", png_bytes())},
                  data={"prompt": "a", "image_path": "cat.png"})
    assert r.status_code == 422 and "image_path" in r.json()["detail"]
    r = http.post("/v1/tasks/video/form", files={"image_file": ("big.png", b"\x89PNG" + b"\0" * 2**20)},
                  data={"prompt": "a"})
    assert r.status_code == 413 and "upload limit" in r.json()["detail"]
    assert http.get("/v1/service/status").json()["total_tasks"] == before
    assert list((server.root / "inputs").iterdir())  # nothing removed; nothing written outside the data folder
    assert sorted(p.name for p in server.root.iterdir()) == ["data", "inputs", "secret.png"]
