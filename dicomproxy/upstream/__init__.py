"""The upstream PACS over HTTP: the streaming client and pool (``client``), the ``Upstream``
object the gateway holds, and the reachability monitor (``monitor``)."""

from dicomproxy.upstream.upstream import Upstream

__all__ = ["Upstream"]
