"""Configuration: ``appsettings.json`` read the ASP.NET way into one typed, frozen :class:`Settings`."""

from __future__ import annotations

from dicomproxy.config.errors import ConfigError
from dicomproxy.config.loader import load_settings
from dicomproxy.config.model import Settings

__all__ = ["ConfigError", "Settings", "load_settings"]
