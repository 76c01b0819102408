"""docs/deploy: the docker compose example and the Kubernetes manifest hold together and hold with
the gateway: every key of their appsettings loads through the real config loader (with the
Dockerfile's and the manifests' environment variables on top, as the image would), the names and
ports they point at are services they define, the probe paths are the gateway's own routes, the
grace periods sit above ``Server:ShutdownTimeoutSeconds``, and the nginx.conf passes ``nginx -t``
(Debian's nginx, upstream names swapped for loopback). No Docker or Kubernetes is needed: the
files are parsed with PyYAML. tests/e2e/test_tus_replicas.py runs the same nginx.conf,
appsettings.Cluster.json and lua/main.lua in front of three real replicas."""

from __future__ import annotations

import json
import re
import shlex
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from dicomproxy.config.loader import load_settings
from dicomproxy.config.model import Settings
from dicomproxy.http.api import LIVE_PATH, READY_PATH
from dicomproxy.notify.notifications import PREFIX as NOTIFICATIONS_PREFIX
from tests.peers import DEPLOY_NGINX_CONF, REPO_ROOT, NginxBalancer

COMPOSE_DIR = REPO_ROOT / "docs" / "deploy" / "compose"
COMPOSE = COMPOSE_DIR / "docker-compose.yml"
CLUSTER_SETTINGS = COMPOSE_DIR / "appsettings.Cluster.json"
MAIN_LUA = COMPOSE_DIR / "lua" / "main.lua"
KUBERNETES = REPO_ROOT / "docs" / "deploy" / "kubernetes" / "dicomproxy.yaml"
SECRETS = "/run/secrets/"
GATEWAYS = ("gateway1", "gateway2", "gateway3")


def _compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return data


def _manifests() -> dict[str, dict[str, Any]]:
    """The Kubernetes documents by ``Kind/name``."""
    return {f"{d['kind']}/{d['metadata']['name']}": d for d in yaml.safe_load_all(KUBERNETES.read_text()) if d}


def _dockerfile_env() -> dict[str, str]:
    """The ``ENV`` of the repository's Dockerfile (what the image sets before compose or the pod spec)."""
    text = (REPO_ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    env: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("ENV "):
            env.update(tok.split("=", 1) for tok in shlex.split(line[4:]) if "=" in tok)  # type: ignore[misc]
    return env


def _secret_files(text: str) -> set[str]:
    return set(re.findall(re.escape(SECRETS) + r"([\w.-]+)", text))


def _load(tmp_path: Path, cluster_json: str, environ: Mapping[str, str],
          secrets: Mapping[str, str] | None = None) -> Settings:
    """Load ``cluster_json`` as the image does: /app/appsettings.json (the repository's) and
    appsettings.Cluster.json beside it (DICOMPROXY_ENVIRONMENT=Cluster in ``environ``), the secret
    files of /run/secrets moved under ``tmp_path``."""
    site, run = tmp_path / "app", tmp_path / "run-secrets"
    site.mkdir()
    run.mkdir()
    for name in _secret_files(cluster_json):
        (run / name).write_text((secrets or {}).get(name, f"secret-{name}") + "\n")
    shutil.copy(REPO_ROOT / "appsettings.json", site / "appsettings.json")
    (site / "appsettings.Cluster.json").write_text(cluster_json.replace(SECRETS, f"{run}/"))
    return load_settings(site / "appsettings.json", environ=dict(environ))


def _port(url: str) -> int:
    parts = urlsplit(url)
    return parts.port or {"http": 80, "https": 443, "redis": 6379}[parts.scheme]


# --------------------------------------------------------------------------- docker compose
def test_the_compose_file_runs_three_gateways_from_the_repository_dockerfile() -> None:
    services = _compose()["services"]
    assert {"nginx", *GATEWAYS, "redis", "seaweedfs", "seaweedfs-bucket", "orthanc"} <= set(services)
    for name in GATEWAYS:
        gateway = services[name]
        context = (COMPOSE_DIR / gateway["build"]["context"]).resolve()
        assert context == REPO_ROOT and (context / gateway["build"]["dockerfile"]).is_file()
        assert gateway["environment"]["DICOMPROXY_ENVIRONMENT"] == "Cluster"
        assert gateway["environment"]["DICOMPROXY__ExtraConfig__Replica"] == name
        mounts = {m.split(":")[1]: (COMPOSE_DIR / m.split(":")[0]) for m in gateway["volumes"] if m.startswith("./")}
        assert mounts["/app/appsettings.Cluster.json"] == CLUSTER_SETTINGS and mounts["/app/lua"] == MAIN_LUA.parent
        assert [m for m in gateway["volumes"] if m.endswith(":/app/data")] == [f"{name}-data:/app/data"]  # own spool
    ports = [p for name in GATEWAYS for p in services[name]["ports"]]
    assert len({p.split(":")[0] for p in ports}) == 3  # three host ports for three DICOM listeners
    nginx_mounts = {m.split(":")[1]: COMPOSE_DIR / m.split(":")[0] for m in services["nginx"]["volumes"]}
    assert nginx_mounts["/etc/nginx/nginx.conf"].resolve() == DEPLOY_NGINX_CONF
    assert set(services["nginx"]["depends_on"]) == set(GATEWAYS)
    assert all(c["condition"] == "service_healthy" for c in services["nginx"]["depends_on"].values())


def test_the_compose_configuration_loads_and_points_at_its_own_services(tmp_path: Path) -> None:
    compose = _compose()
    services = compose["services"]
    gateway = services["gateway2"]
    env = {**_dockerfile_env(), **{k: str(v) for k, v in gateway["environment"].items()}}
    settings = _load(tmp_path, CLUSTER_SETTINGS.read_text(), env, {"s3-secret-key": "s3-secret"})
    assert settings.files[-1].name == "appsettings.Cluster.json"
    assert settings.extra_config.model_extra == {"Replica": "gateway2"}  # what lua/main.lua names
    # Redis, S3 and the PACS are services of the file, on the ports they listen on
    redis = urlsplit(settings.cluster.redis)
    assert redis.hostname == "redis" and _port(settings.cluster.redis) == 6379 and settings.cluster.redis_password
    assert "--requirepass" in " ".join(services["redis"]["command"])
    s3 = settings.tus.s3
    assert settings.tus.store == "s3" and s3.secret_key == "s3-secret"
    weed = services["seaweedfs"]
    assert urlsplit(s3.endpoint).hostname == "seaweedfs" and weed["command"][0] == "server" and "-s3" in weed["command"]
    assert f"-s3.port={_port(s3.endpoint)}" in weed["command"]
    assert weed["environment"]["AWS_ACCESS_KEY_ID"] == s3.access_key  # SeaweedFS's only identity
    assert f"-name {s3.bucket}" in services["seaweedfs-bucket"]["command"][0]
    assert urlsplit(settings.upstream.url).hostname == "orthanc" and settings.upstream.password
    assert settings.dicom.upstream.host == "orthanc"
    assert services["orthanc"]["environment"]["DICOM_WEB_PLUGIN_ENABLED"] == "true"
    assert settings.upstream.username in services["orthanc"]["environment"]["ORTHANC__REGISTERED_USERS"]
    # every secret file the configuration reads is a secret the gateways get
    assert _secret_files(CLUSTER_SETTINGS.read_text()) == set(gateway["secrets"]) <= set(compose["secrets"])
    # the probes and the grace period
    assert settings.host == "0.0.0.0" and settings.port == 8080
    probe = " ".join(gateway["healthcheck"]["test"])
    assert f"http://127.0.0.1:{settings.port}{READY_PATH}" in probe
    grace = float(gateway["stop_grace_period"].rstrip("s"))
    assert settings.server.shutdown_timeout < grace <= settings.server.shutdown_timeout + 10
    assert settings.server.drain_delay > 0  # the load balancer gets time to notice ready's 503


# --------------------------------------------------------------------------- nginx
def _nginx_locations(text: str) -> dict[str, str]:
    return {m.group(1): m.group(2) for m in re.finditer(r"location\s+([^\s{]+)\s*\{([^}]*)\}", text)}


def test_the_nginx_conf_passes_nginx_t_with_the_gateways_on_loopback(tmp_path: Path) -> None:
    result = NginxBalancer(tmp_path / "nginx", [18081, 18082, 18083], example=DEPLOY_NGINX_CONF).check()
    assert result.returncode == 0 and "test is successful" in result.stderr, result.stderr


def test_the_nginx_conf_streams_uploads_and_events_to_the_gateways_routes(tmp_path: Path) -> None:
    text = re.sub(r"#.*", "", DEPLOY_NGINX_CONF.read_text())  # directives only
    servers = re.findall(r"^\s*server\s+([\w.-]+):(\d+)", text, flags=re.M)
    assert [(h, int(p)) for h, p in servers] == [(g, 8080) for g in GATEWAYS]
    upstream = re.search(r"upstream\s+\w+\s*\{([^}]*)\}", text)
    assert upstream and not re.search(r"\b(ip_hash|hash|sticky|least_conn|random)\b", upstream[1])  # round robin
    settings = _load(tmp_path, CLUSTER_SETTINGS.read_text(), {**_dockerfile_env(), "DICOMPROXY_ENVIRONMENT": "Cluster"})
    locations = _nginx_locations(text)
    tus = locations[settings.tus.base_path]
    assert "proxy_request_buffering off;" in tus and "proxy_buffering off;" in tus
    sse = locations[NOTIFICATIONS_PREFIX]  # /dicomproxy/notifications/stream, and the Accept: text/event-stream form
    assert "proxy_buffering off;" in sse
    read_timeout = re.search(r"proxy_read_timeout\s+(\d+)([smh]);", sse)
    assert read_timeout and int(read_timeout[1]) * {"s": 1, "m": 60, "h": 3600}[read_timeout[2]] > 15  # heartbeat
    assert READY_PATH.startswith(next(p for p in locations if p.startswith("/dicomproxy/health")))
    size = re.search(r"client_max_body_size\s+(\d+)([kmg]?);", text)
    assert size, "client_max_body_size is missing: nginx's default (1 MiB) would refuse TUS PATCHes"
    limit = int(size[1]) << {"": 0, "k": 10, "m": 20, "g": 30}[size[2]]
    assert limit == 0 or limit >= settings.tus.max_size  # a whole upload may be one PATCH (tus-js-client)


# --------------------------------------------------------------------------- Kubernetes
def test_the_kubernetes_manifest_loads_and_its_probes_are_the_gateways(tmp_path: Path) -> None:
    docs = _manifests()
    deployment, secret = docs["Deployment/dicomproxy"], docs["Secret/dicomproxy-secrets"]
    config = docs["ConfigMap/dicomproxy-config"]["data"]
    assert deployment["spec"]["replicas"] == 3
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {e["name"]: e.get("value", "") for e in container["env"]}
    assert env["DICOMPROXY_ENVIRONMENT"] == "Cluster"
    replica = next(e for e in container["env"] if e["name"] == "DICOMPROXY__ExtraConfig__Replica")
    assert replica["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    env["DICOMPROXY__ExtraConfig__Replica"] = "dicomproxy-7d9f-abcde"
    settings = _load(tmp_path, config["appsettings.Cluster.json"], {**_dockerfile_env(), **env},
                     secret["stringData"])
    assert settings.tus.store == "s3" and settings.cluster.redis and settings.tus.s3.secret_key == "CHANGE-ME"
    # the secret holds every file the configuration reads, mounted where it reads them
    assert _secret_files(config["appsettings.Cluster.json"]) <= set(secret["stringData"])
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts[SECRETS.rstrip("/")]["name"] == "secrets"
    assert mounts["/app/appsettings.Cluster.json"]["subPath"] == "appsettings.Cluster.json"
    assert mounts["/app/lua/main.lua"]["subPath"] == "main.lua" and config["main.lua"] == MAIN_LUA.read_text()
    # probes: the gateway's own routes, on the port it listens on
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["http"] == settings.port and ports["dicom"] == settings.dicom.port
    assert container["livenessProbe"]["httpGet"] == {"path": LIVE_PATH, "port": "http"}
    assert container["readinessProbe"]["httpGet"] == {"path": READY_PATH, "port": "http"}
    assert container["startupProbe"]["httpGet"]["path"] == LIVE_PATH
    # the kubelet's SIGKILL comes after the gateway's own deadline, not before
    grace = pod["terminationGracePeriodSeconds"]
    assert settings.server.shutdown_timeout < grace <= settings.server.shutdown_timeout + 10
    # the Service and Redis
    service = docs["Service/dicomproxy"]
    assert service["spec"]["selector"] == deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    redis_host = urlsplit(settings.cluster.redis).hostname
    redis_service = docs[f"Service/{redis_host}"]
    assert redis_service["spec"]["ports"][0]["port"] == _port(settings.cluster.redis)
    redis_pod = docs[f"Deployment/{redis_host}"]["spec"]["template"]
    assert redis_service["spec"]["selector"] == redis_pod["metadata"]["labels"]
    assert "--requirepass" in " ".join(redis_pod["spec"]["containers"][0]["command"])


def test_the_examples_hold_the_same_cluster_settings(tmp_path: Path) -> None:
    """The compose file and the manifest differ in host names only: the same keys, leases, limits."""
    compose = json.loads(CLUSTER_SETTINGS.read_text())
    kube = json.loads(_manifests()["ConfigMap/dicomproxy-config"]["data"]["appsettings.Cluster.json"])

    def shape(tree: Any) -> Any:
        if isinstance(tree, dict):
            return {k: shape(v) for k, v in tree.items() if k not in ("Url", "Endpoint", "Redis", "Host")}
        return tree

    assert shape(compose) == shape(kube)


@pytest.mark.parametrize("path", [LIVE_PATH, READY_PATH])
def test_the_probe_paths_are_answered_before_any_hook(path: str) -> None:
    """The probes the manifests name are the gateway's probe routes (answered before authentication
    and Lua, so a script's onHttpResponse, like the example's, never runs for them)."""
    from dicomproxy.http.api import PROBE_PATHS

    assert path in PROBE_PATHS


def test_a_mistyped_key_in_the_example_would_fail_these_tests(tmp_path: Path) -> None:
    """The loader these tests use rejects what the gateway would reject at start-up, naming the key."""
    from dicomproxy.config.errors import ConfigError

    typo = CLUSTER_SETTINGS.read_text().replace('"PartSizeMB"', '"PartSizeMb2"')
    with pytest.raises(ConfigError, match="PartSizeMb2"):
        _load(tmp_path, typo, {**_dockerfile_env(), "DICOMPROXY_ENVIRONMENT": "Cluster"})
