"""The one exception the configuration raises: :class:`ConfigError`.

Its message is one line that names where the value came from (a file, an environment variable,
the command line), the key and the fix, because it is printed as it is by ``dicomproxy serve``
(``dicomproxy: config error: <message>``, exit code 2).
"""

from __future__ import annotations


class ConfigError(Exception):
    """A configuration problem, worded so that the message alone tells the user the fix."""
