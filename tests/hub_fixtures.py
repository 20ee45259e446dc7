"""Fixture: the test Hub server on 127.0.0.1 (port 0), with huggingface_hub and transformers pointed at it.

huggingface_hub (1.x and 2.x) reads ``HF_ENDPOINT``, ``HF_HUB_OFFLINE``, ``HF_HUB_DISABLE_XET`` and the cache path
into `huggingface_hub.constants` at import time, so setting the environment is not enough: those constants are patched
as well (and restored by monkeypatch). transformers 5 asks `huggingface_hub.constants` at call time.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hub_server import HubServer

TOKEN = "hf_test_token"
USER = "user"


@pytest.fixture(scope="session")
def hub_server() -> Iterator[HubServer]:
    server = HubServer(tokens={TOKEN: USER, "hf_other_token": "other"}).start()
    yield server
    server.stop()


@pytest.fixture
def hub(hub_server: HubServer, monkeypatch: pytest.MonkeyPatch, tmp_path_factory) -> Iterator[HubServer]:
    """The running test Hub, with every Hub client in this process talking to it (and to nothing else)."""
    import huggingface_hub.constants as constants
    import huggingface_hub.hf_api as hf_api

    url = hub_server.url
    cache = str(tmp_path_factory.mktemp("hf_cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", url)
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setattr(constants, "ENDPOINT", url)
    template = url + "/{repo_id}/resolve/{revision}/{filename}"
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", template)
    # module-level helpers (file_exists, model_info, ...) are methods of an HfApi made at import time
    monkeypatch.setattr(hf_api.api, "endpoint", url)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", cache)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", cache + "/token")  # never read a developer's stored login
    hub_server.clear_failures()
    yield hub_server
    hub_server.clear_failures()
