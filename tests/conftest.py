import os

import pytest


@pytest.fixture(autouse=True, scope="session")
def _tiny_model_cache(tmp_path_factory):
    """Keep the built-in tiny model of the tests out of the user's cache folder."""
    if "LIGHTX2V_CACHE_DIR" not in os.environ:
        os.environ["LIGHTX2V_CACHE_DIR"] = str(tmp_path_factory.mktemp("lightx2v-cache"))
    yield


@pytest.fixture(scope="session")
def tiny_diffusers_t2v(tmp_path_factory):
    """A tiny random-weight Wan2.1 T2V pipeline built and saved by diffusers (diffusers layout)."""
    from tiny_reference import build_diffusers_wan_pipeline

    folder = tmp_path_factory.mktemp("tiny-diffusers-t2v")
    pipe = build_diffusers_wan_pipeline(folder / "tok")
    pipe.save_pretrained(folder / "model")
    return folder / "model", pipe
