"""The names the rest of the gateway imports (``from dicomproxy.config.settings import Settings``).

The configuration lives in four modules, one concept each: :mod:`~dicomproxy.config.model`
(every key, declared once), :mod:`~dicomproxy.config.loader` (the layers: files, environment,
command line), :mod:`~dicomproxy.config.tree` (the masked view others may see) and
:mod:`~dicomproxy.config.docs` (the README table). This module only re-exports them, so
consumers keep their imports.
"""

from __future__ import annotations

from dicomproxy.config.errors import ConfigError
from dicomproxy.config.fields import resolve_path
from dicomproxy.config.loader import ENV_PREFIX, load_settings
from dicomproxy.config.model import (
    AuditCollector,
    AuditSettings,
    AuthenticationSettings,
    ClusterSettings,
    CorsSettings,
    DicomSettings,
    DicomTlsSettings,
    EmailRule,
    ExtraConfigSettings,
    HttpsSettings,
    LoggingSettings,
    LuaSettings,
    ModalityAe,
    NotificationSettings,
    OrthancSettings,
    PacsAe,
    RemoteAe,
    ServerSettings,
    Settings,
    SmtpSettings,
    TusS3Settings,
    TusSettings,
    UpstreamSettings,
    UserEntry,
)
from dicomproxy.config.tree import ConfigTree

__all__ = [
    "ENV_PREFIX",
    "AuditCollector",
    "AuditSettings",
    "AuthenticationSettings",
    "ClusterSettings",
    "ConfigError",
    "ConfigTree",
    "CorsSettings",
    "DicomSettings",
    "DicomTlsSettings",
    "EmailRule",
    "ExtraConfigSettings",
    "HttpsSettings",
    "LoggingSettings",
    "LuaSettings",
    "ModalityAe",
    "NotificationSettings",
    "OrthancSettings",
    "PacsAe",
    "RemoteAe",
    "ServerSettings",
    "Settings",
    "SmtpSettings",
    "TusS3Settings",
    "TusSettings",
    "UpstreamSettings",
    "UserEntry",
    "load_settings",
    "resolve_path",
]
