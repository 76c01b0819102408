"""The gateway's own PACS credentials: split out of Upstream:Url, sent to the PACS's origin only."""

from __future__ import annotations

import httpx
import pytest

from dicomproxy.config.errors import ConfigError
from dicomproxy.config.fields import mask_userinfo
from dicomproxy.config.settings import UpstreamSettings, load_settings
from dicomproxy.upstream.credentials import PacsAuth, split_userinfo
from dicomproxy.upstream.pool import Origin
from dicomproxy.upstream.upstream import Upstream


def test_split_userinfo() -> None:
    assert split_userinfo("http://u:p%40ss@pacs:8042/orthanc") == ("http://pacs:8042/orthanc", ("u", "p@ss"))
    assert split_userinfo("http://pacs:8042") == ("http://pacs:8042", None)
    assert split_userinfo("https://u@[::1]:8443") == ("https://[::1]:8443", ("u", ""))


def test_mask_userinfo() -> None:
    assert mask_userinfo("http://u:secret@pacs:8042/x") == "http://u:***@pacs:8042/x"
    assert mask_userinfo("http://u@pacs") == "http://u@pacs"
    assert mask_userinfo("http://pacs/a@b") == "http://pacs/a@b"


def flow(auth: httpx.Auth, url: str, **headers: str) -> httpx.Request:
    request = httpx.Request("GET", url, headers=headers)
    return next(auth.sync_auth_flow(request))


def test_sent_to_the_pacs_origin_only_and_never_over_a_requests_own() -> None:
    auth = PacsAuth(Origin.of("http://pacs:8042"), "gw", "pw")
    assert flow(auth, "http://pacs:8042/system").headers["authorization"] == "Basic Z3c6cHc="
    for other in ("http://pacs:8043/", "https://pacs:8042/", "http://evil.example/", "http://pacs/"):
        assert "authorization" not in flow(auth, other).headers, other
    assert flow(auth, "http://pacs:8042/", Authorization="Bearer t").headers["authorization"] == "Bearer t"
    assert "pw" not in repr(auth)


def test_upstream_base_never_shows_the_password() -> None:
    up = Upstream(UpstreamSettings.model_validate({"Url": "http://gw:S3CRET@pacs:8042"}))
    assert up.base == "http://pacs:8042" and up.url("/system") == "http://pacs:8042/system"
    assert isinstance(up.client.auth, PacsAuth)
    named = Upstream(UpstreamSettings.model_validate({"Url": "http://pacs:8042", "Username": "gw", "Password": "pw"}))
    assert isinstance(named.client.auth, PacsAuth)
    assert not isinstance(Upstream(UpstreamSettings()).client.auth, PacsAuth)


def test_config_rules_and_masked_views() -> None:
    with pytest.raises(ConfigError, match="keep one"):
        load_settings(None, environ={"DICOMPROXY__Upstream__Url": "http://a:b@pacs",
                                     "DICOMPROXY__Upstream__Username": "x"})
    with pytest.raises(ConfigError, match="without Upstream:Username"):
        load_settings(None, environ={"DICOMPROXY__Upstream__Password": "x"})
    with pytest.raises(ConfigError, match="PublicUrl"):
        load_settings(None, environ={"DICOMPROXY__Upstream__PublicUrl": "https://gw/path"})
    settings = load_settings(None, environ={"DICOMPROXY__Upstream__Url": "http://gw:S3CRET@pacs:8042"})
    assert "S3CRET" not in repr(settings)
    assert settings.tree["Upstream:Url"] == settings.lua_config()["Upstream:Url"] == "http://gw:***@pacs:8042"
    with pytest.raises(ConfigError) as e:
        load_settings(None, environ={"DICOMPROXY__Upstream__Url": "ftp://gw:S3CRET@pacs"})
    assert "S3CRET" not in str(e.value)
