"""Configuration: ``appsettings.json`` read the ASP.NET way, turned into one typed object.

The rules (see the README's configuration table):

* nested JSON; a key path is written with colons (``Upstream:Url``) and keys are
  case-insensitive;
* environment variables override the file: ``DICOMPROXY__Upstream__Url=http://pacs:8042``
  (``__`` stands for ``:``);
* ``ConfigRoot`` is the folder of the file and relative paths resolve against it.

Everything is validated at start-up: a malformed file or a value of the wrong type raises
:class:`ConfigError` whose one-line message names the file, the key and what was expected,
because a gateway that starts with half a config is worse than one that does not start.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

ENV_PREFIX = "DICOMPROXY__"

DEFAULTS: dict[str, Any] = {
    "Urls": "http://127.0.0.1:8080",
    "Upstream": {
        "Url": "http://127.0.0.1:8042",
        "DicomWebRoot": "/dicom-web",
        "ConnectTimeoutSeconds": 5,
        "ReadTimeoutSeconds": 120,
        "MaxConnections": 256,
    },
    "ExtraConfig": {
        "ScriptsRoot": "lua",
        "TusUploadFolder": "data/tus",
        "DataFolder": "data",
    },
    "Lua": {
        "TimeoutMs": 5000,
        "TaskTimeoutMs": 60000,
        "MaxMemoryMB": 64,
        "FailOpen": False,
        "ReloadIntervalMs": 1000,
        "BackgroundWorkers": 2,
        "OsExecuteTimeoutSeconds": 60,
        "NativePath": "/usr/lib/x86_64-linux-gnu/lua/5.4/?.so;/usr/local/lib/lua/5.4/?.so",
        "FullLibraries": False,
        "TaskMaxRestarts": 3,
    },
    "Authentication": {"Users": {}, "Realm": "DicomProxy"},
    "Tus": {
        "BasePath": "/files/",
        "MaxSize": 0,
        "ExpireAfter": "1.00:00:00",
        "SweepIntervalSeconds": 60,
        "KeepAfterImport": False,
        "ImportBatchSize": 50,
        "LockTimeoutSeconds": 20,
        "Fsync": "Complete",
    },
    "Dicom": {
        "Aet": "DICOMPROXY",
        "Port": 11112,
        "Host": "0.0.0.0",
        "Upstream": {"Aet": "ORTHANC", "Host": "127.0.0.1", "Port": 4242},
        "Modalities": {},
        "AllowedCallingAets": [],
        "ForwardVia": "dimse",
        "SpoolFolder": "data/spool",
        "ForwardRetrySeconds": 2,
        "ForwardMaxRetrySeconds": 60,
        "ForwardMaxAttempts": 0,
        "ForwardConcurrency": 4,
    },
    "Smtp": {
        "Host": "",
        "Port": 25,
        "Security": "None",
        "Username": "",
        "Password": "",
        "From": "dicomproxy@localhost",
        "TimeoutSeconds": 30,
        "Retries": 3,
        "RetrySeconds": 2,
        "CaFile": "",
    },
    "Notifications": {"FeedSize": 200, "Email": []},
    "Orthanc": {"LuaHeartBeatPeriod": 0, "PollIntervalSeconds": 1},
    "Logging": {"Level": "INFO"},
}


class ConfigError(Exception):
    """A configuration problem, worded so that the message alone tells the user the fix."""


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """Case-insensitive deep merge; the overriding key's spelling wins."""
    out = dict(base)
    lower = {k.lower(): k for k in out}
    for key, value in over.items():
        existing = lower.get(key.lower())
        if existing is not None and existing != key:
            out[key] = out.pop(existing)
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
        lower[key.lower()] = key
    return out


class ConfigTree(Mapping[str, Any]):
    """A read-only, case-insensitive view of the merged configuration.

    ``tree["Upstream:Url"]`` returns the leaf; ``tree["Upstream"]`` returns the section as a
    plain dict. Lua's ``Config[...]`` is backed by this object.
    """

    def __init__(self, data: dict[str, Any], source: str) -> None:
        self._data = data
        self.source = source

    def _find(self, path: str) -> tuple[bool, Any]:
        node: Any = self._data
        for part in path.split(":"):
            if not isinstance(node, dict):
                return False, None
            match = next((k for k in node if k.lower() == part.lower()), None)
            if match is None:
                return False, None
            node = node[match]
        return True, node

    def __getitem__(self, path: str) -> Any:
        found, value = self._find(path)
        if not found:
            raise KeyError(path)
        return value

    def get(self, path: str, default: Any = None) -> Any:
        found, value = self._find(path)
        return value if found else default

    def __contains__(self, path: object) -> bool:
        return isinstance(path, str) and self._find(path)[0]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def as_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(self._data))

    # -- typed readers: each error names the file, the key and what was expected ----------
    def _fail(self, key: str, expected: str, value: Any) -> ConfigError:
        return ConfigError(f"{self.source}: {key}: expected {expected}, got {value!r}")

    def str(self, key: str) -> str:
        value = self[key]
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise self._fail(key, "a string", value)
        return str(value)

    def int(self, key: str, minimum: int | None = None) -> int:
        value = self[key]
        if isinstance(value, bool):
            raise self._fail(key, "an integer", value)
        if isinstance(value, str) and re.fullmatch(r"\s*-?\d+\s*", value):
            value = int(value)
        if not isinstance(value, int):
            raise self._fail(key, "an integer", value)
        if minimum is not None and value < minimum:
            raise self._fail(key, f"an integer >= {minimum}", value)
        return value

    def float(self, key: str, minimum: float | None = None) -> float:
        value = self[key]
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise self._fail(key, "a number", value) from None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self._fail(key, "a number", value)
        if minimum is not None and value < minimum:
            raise self._fail(key, f"a number >= {minimum}", value)
        return float(value)

    def bool(self, key: str) -> bool:
        value = self[key]
        if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.strip().lower() in ("true", "1", "yes")
        if not isinstance(value, bool):
            raise self._fail(key, "true or false", value)
        return value

    def dict(self, key: str) -> dict[str, Any]:
        value = self[key]
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError:
                raise self._fail(key, "a JSON object", value) from None
        if not isinstance(value, dict):
            raise self._fail(key, "an object", value)
        return value

    def list(self, key: str) -> list[Any]:
        value = self[key]
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()] if not value.startswith("[") else None
            if value is None:
                try:
                    value = json.loads(self[key])
                except ValueError:
                    raise self._fail(key, "a JSON array", self[key]) from None
        if not isinstance(value, list):
            raise self._fail(key, "an array", value)
        return value

    def choice(self, key: str, choices: tuple[str, ...]) -> str:
        value = self.str(key)
        for c in choices:
            if c.lower() == value.lower():
                return c
        raise self._fail(key, "one of " + ", ".join(choices), value)

    def duration(self, key: str) -> float:
        """Seconds, from a number of seconds or an ASP.NET TimeSpan ``[d.]hh:mm:ss``."""
        value = self[key]
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            m = re.fullmatch(r"\s*(?:(\d+)\.)?(\d+):(\d\d):(\d\d(?:\.\d+)?)\s*", value)
            if m:
                d, h, mi, s = m.groups()
                return int(d or 0) * 86400 + int(h) * 3600 + int(mi) * 60 + float(s)
            try:
                return float(value)
            except ValueError:
                pass
        raise self._fail(key, "seconds or a time span like 1.00:00:00", value)

    def path(self, key: str, root: Path) -> Path:
        return resolve_path(self.str(key), root)


def resolve_path(value: str, root: Path) -> Path:
    p = Path(os.path.expanduser(value))
    return p if p.is_absolute() else (root / p).resolve()


# --------------------------------------------------------------------------- typed sections
@dataclass(frozen=True)
class RemoteAe:
    aet: str
    host: str
    port: int


@dataclass(frozen=True)
class UpstreamSettings:
    url: str
    dicomweb_root: str
    connect_timeout: float
    read_timeout: float
    max_connections: int


@dataclass(frozen=True)
class LuaSettings:
    scripts_root: Path
    timeout_ms: int
    task_timeout_ms: int
    max_memory_mb: int
    fail_open: bool
    fail_open_hooks: frozenset[str]
    reload_interval_ms: int
    background_workers: int
    os_execute_timeout: float
    native_path: str
    full_libraries: bool = False  # os.execute, io, os.getenv... for scripts (the README's "Lua trust model")
    task_max_restarts: int = 3  # a task found running at start-up more often than this is quarantined


@dataclass(frozen=True)
class TusSettings:
    base_path: str
    upload_folder: Path
    max_size: int
    expire_after: float
    sweep_interval: float
    keep_after_import: bool
    import_batch_size: int
    lock_timeout: float
    fsync: str = "complete"  # when stored bytes are fsynced: "complete" | "patch" | "none"


@dataclass(frozen=True)
class DicomSettings:
    aet: str
    port: int
    host: str
    upstream: RemoteAe
    modalities: dict[str, RemoteAe]
    allowed_calling_aets: tuple[str, ...]
    forward_via: str
    spool_folder: Path
    forward_retry: float
    forward_max_retry: float
    forward_max_attempts: int
    forward_concurrency: int = 4


@dataclass(frozen=True)
class SmtpSettings:
    host: str
    port: int
    security: str
    username: str
    password: str
    sender: str
    timeout: float
    retries: int
    retry_delay: float = 2.0  # first retry after this, doubling each time
    ca_file: Path | None = None  # PEM bundle to trust for StartTls/Tls instead of the system's


@dataclass(frozen=True)
class EmailRule:
    events: tuple[str, ...]
    to: tuple[str, ...]


@dataclass(frozen=True)
class NotificationSettings:
    feed_size: int
    email: tuple[EmailRule, ...]


@dataclass(frozen=True)
class OrthancSettings:
    """The Orthanc-compatible Lua layer (docs/orthanc-compat.md)."""

    heartbeat_period: float = 0.0  # OnHeartBeat every N seconds (Orthanc's LuaHeartBeatPeriod); 0 = off
    poll_interval: float = 1.0  # how often the PACS's /changes (and /jobs) are read for the On* callbacks


@dataclass(frozen=True)
class Settings:
    """The whole configuration, typed. Built once by :func:`load_settings`; never mutated."""

    config_file: Path | None
    config_root: Path
    host: str
    port: int
    upstream: UpstreamSettings
    data_folder: Path
    lua: LuaSettings
    users: dict[str, str]
    realm: str
    tus: TusSettings
    dicom: DicomSettings
    smtp: SmtpSettings
    notifications: NotificationSettings
    log_level: str
    tree: ConfigTree = field(repr=False)
    orthanc: OrthancSettings = field(default_factory=OrthancSettings)

    def lua_config(self) -> dict[str, Any]:
        """What Lua's ``Config[...]`` sees: every leaf by its colon path, plus ``ConfigRoot``."""
        flat: dict[str, Any] = {}

        def walk(prefix: str, node: Any) -> None:
            if isinstance(node, dict):
                for k, v in node.items():
                    walk(f"{prefix}:{k}" if prefix else k, v)
            else:
                flat[prefix] = node

        walk("", self.tree.as_dict())
        flat["ConfigRoot"] = str(self.config_root)
        flat["ExtraConfig:ScriptsRoot"] = str(self.lua.scripts_root)
        flat["ExtraConfig:TusUploadFolder"] = str(self.tus.upload_folder)
        flat["ExtraConfig:DataFolder"] = str(self.data_folder)
        return flat


def _env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in environ.items():
        if not name.upper().startswith(ENV_PREFIX):
            continue
        parts = [p for p in name[len(ENV_PREFIX):].split("__") if p]
        if not parts:
            continue
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                break
        else:
            node[parts[-1]] = value
    return out


def _remote_ae(tree: ConfigTree, key: str) -> RemoteAe:
    raw = tree.dict(key)
    sub = ConfigTree(raw, tree.source)
    for k in ("Aet", "Host", "Port"):
        if k not in sub:
            raise ConfigError(f"{tree.source}: {key}: expected an object with Aet, Host and Port, got {raw!r}")
    return RemoteAe(sub.str("Aet"), sub.str("Host"), sub.int("Port", 1))


def _parse_urls(tree: ConfigTree) -> tuple[str, int]:
    first = tree.str("Urls").split(";")[0].strip()
    parts = urlsplit(first)
    if parts.scheme not in ("http",) or not parts.hostname:
        raise ConfigError(f"{tree.source}: Urls: expected http://HOST:PORT, got {first!r}")
    host = parts.hostname
    if host in ("*", "+"):
        host = "0.0.0.0"
    return host, parts.port or 80


def load_settings(
    path: str | Path | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Read ``path`` (default: ``./appsettings.json`` if present), apply environment overrides."""
    environ = os.environ if environ is None else environ
    file: Path | None = None
    if path is not None:
        file = Path(path).resolve()
        if not file.is_file():
            raise ConfigError(f"{file}: the config file does not exist (pass --config PATH)")
    elif Path("appsettings.json").is_file():
        file = Path("appsettings.json").resolve()
    data: dict[str, Any] = {}
    source = str(file) if file else "(defaults)"
    if file is not None:
        try:
            data = json.loads(file.read_text(encoding="utf-8-sig"))
        except json.JSONDecodeError as e:
            raise ConfigError(f"{file}:{e.lineno}:{e.colno}: not valid JSON: {e.msg}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{file}: expected a JSON object at the top level")
    merged = _merge(_merge(DEFAULTS, data), _env_overrides(environ))
    if overrides:
        merged = _merge(merged, overrides)
    tree = ConfigTree(merged, source)
    root = file.parent if file else Path.cwd()
    return build_settings(tree, root, file)


def _fail_open(tree: ConfigTree) -> bool | frozenset[str]:
    """``Lua:FailOpen``: true/false for every hook, or the names of the callbacks that fail open."""
    value = tree["Lua:FailOpen"]
    if isinstance(value, list):
        if not all(isinstance(v, str) and v for v in value):
            raise ConfigError(f"{tree.source}: Lua:FailOpen: expected true, false or a list of callback names, "
                              f"got {value!r}")
        return frozenset(value)
    return tree.bool("Lua:FailOpen")


def build_settings(tree: ConfigTree, root: Path, file: Path | None) -> Settings:
    host, port = _parse_urls(tree)
    upstream_url = tree.str("Upstream:Url").rstrip("/")
    if urlsplit(upstream_url).scheme not in ("http", "https"):
        raise ConfigError(f"{tree.source}: Upstream:Url: expected an http(s) URL, got {upstream_url!r}")
    data_folder = tree.path("ExtraConfig:DataFolder", root)
    users = tree.dict("Authentication:Users")
    for name, pw in users.items():
        if not isinstance(pw, str):
            raise ConfigError(f"{tree.source}: Authentication:Users:{name}: expected a password string")
    base_path = "/" + tree.str("Tus:BasePath").strip("/") + "/"
    modalities = {name: _remote_ae(tree, f"Dicom:Modalities:{name}") for name in tree.dict("Dicom:Modalities")}
    rules = []
    for i, rule in enumerate(tree.list("Notifications:Email")):
        if not isinstance(rule, dict):
            raise ConfigError(f"{tree.source}: Notifications:Email:{i}: expected an object with Events and To")
        sub = ConfigTree(rule, tree.source)
        events = sub.get("Events", ["*"])
        to = sub.get("To", [])
        events = [events] if isinstance(events, str) else events
        to = [to] if isinstance(to, str) else to
        if not isinstance(events, list) or not isinstance(to, list) or not to:
            raise ConfigError(
                f"{tree.source}: Notifications:Email:{i}: expected Events (list) and To (non-empty list)"
            )
        rules.append(EmailRule(tuple(map(str, events)), tuple(map(str, to))))
    return Settings(
        config_file=file,
        config_root=root,
        host=host,
        port=port,
        upstream=UpstreamSettings(
            url=upstream_url,
            dicomweb_root="/" + tree.str("Upstream:DicomWebRoot").strip("/"),
            connect_timeout=tree.float("Upstream:ConnectTimeoutSeconds", 0.001),
            read_timeout=tree.float("Upstream:ReadTimeoutSeconds", 0.001),
            max_connections=tree.int("Upstream:MaxConnections", 1),
        ),
        data_folder=data_folder,
        lua=LuaSettings(
            scripts_root=tree.path("ExtraConfig:ScriptsRoot", root),
            timeout_ms=tree.int("Lua:TimeoutMs", 1),
            task_timeout_ms=tree.int("Lua:TaskTimeoutMs", 1),
            max_memory_mb=tree.int("Lua:MaxMemoryMB", 1),
            fail_open=_fail_open(tree) is True,
            fail_open_hooks=frozenset() if isinstance(_fail_open(tree), bool) else _fail_open(tree),
            reload_interval_ms=tree.int("Lua:ReloadIntervalMs", 50),
            background_workers=tree.int("Lua:BackgroundWorkers", 1),
            os_execute_timeout=tree.float("Lua:OsExecuteTimeoutSeconds", 0.001),
            native_path=tree.str("Lua:NativePath"),
            full_libraries=tree.bool("Lua:FullLibraries"),
            task_max_restarts=tree.int("Lua:TaskMaxRestarts", 0),
        ),
        users=dict(users),
        realm=tree.str("Authentication:Realm"),
        tus=TusSettings(
            base_path=base_path,
            upload_folder=tree.path("ExtraConfig:TusUploadFolder", root),
            max_size=tree.int("Tus:MaxSize", 0),
            expire_after=tree.duration("Tus:ExpireAfter"),
            sweep_interval=tree.float("Tus:SweepIntervalSeconds", 0.05),
            keep_after_import=tree.bool("Tus:KeepAfterImport"),
            import_batch_size=tree.int("Tus:ImportBatchSize", 1),
            lock_timeout=tree.float("Tus:LockTimeoutSeconds", 0),
            fsync=tree.choice("Tus:Fsync", ("Complete", "Patch", "None")).lower(),
        ),
        dicom=DicomSettings(
            aet=tree.str("Dicom:Aet"),
            port=tree.int("Dicom:Port", 0),
            host=tree.str("Dicom:Host"),
            upstream=_remote_ae(tree, "Dicom:Upstream"),
            modalities=modalities,
            allowed_calling_aets=tuple(map(str, tree.list("Dicom:AllowedCallingAets"))),
            forward_via=tree.choice("Dicom:ForwardVia", ("dimse", "dicomweb")),
            spool_folder=tree.path("Dicom:SpoolFolder", root),
            forward_retry=tree.float("Dicom:ForwardRetrySeconds", 0.01),
            forward_max_retry=tree.float("Dicom:ForwardMaxRetrySeconds", 0.01),
            forward_max_attempts=tree.int("Dicom:ForwardMaxAttempts", 0),
            forward_concurrency=tree.int("Dicom:ForwardConcurrency", 1),
        ),
        smtp=SmtpSettings(
            host=tree.str("Smtp:Host"),
            port=tree.int("Smtp:Port", 1),
            security=tree.choice("Smtp:Security", ("None", "StartTls", "Tls")),
            username=tree.str("Smtp:Username"),
            password=tree.str("Smtp:Password"),
            sender=tree.str("Smtp:From"),
            timeout=tree.float("Smtp:TimeoutSeconds", 0.1),
            retries=tree.int("Smtp:Retries", 0),
            retry_delay=tree.float("Smtp:RetrySeconds", 0),
            ca_file=tree.path("Smtp:CaFile", root) if tree.str("Smtp:CaFile") else None,
        ),
        notifications=NotificationSettings(
            feed_size=tree.int("Notifications:FeedSize", 1), email=tuple(rules)
        ),
        log_level=tree.choice("Logging:Level", ("DEBUG", "INFO", "WARNING", "ERROR")),
        tree=tree,
        orthanc=OrthancSettings(
            heartbeat_period=tree.float("Orthanc:LuaHeartBeatPeriod", 0),
            poll_interval=tree.float("Orthanc:PollIntervalSeconds", 0.05),
        ),
    )
