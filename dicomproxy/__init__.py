"""DicomProxy: a Lua-scriptable gateway in front of a PACS."""

__version__ = "0.1.0"
