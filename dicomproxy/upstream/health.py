"""Active health checks of one member: every ``HealthCheck:IntervalSeconds``, an HTTP GET of
``HealthCheck:Path`` on its ``Url`` (any answer below 500 is healthy) and, with
``HealthCheck:Echo``, a C-ECHO of its DICOM side through the gateway's own upper layer (the
``echo`` function the composition root hands in, so this package does not import the DICOM
side). Each check is bounded by ``HealthCheck:TimeoutSeconds``; the outcome goes to
:meth:`Member.checked <dicomproxy.upstream.member.Member.checked>` (the state machine)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

import httpx

from dicomproxy.upstream.member import Member

log = logging.getLogger(__name__)

# C-ECHO of a member's DICOM side: (member, timeout) -> None, raising on failure.
Echo = Callable[[Member, float], Awaitable[None]]


async def check_once(member: Member, echo: Echo | None) -> tuple[bool, str | None]:
    """One active check: (healthy, why not)."""
    settings = member.check
    try:
        async with asyncio.timeout(settings.timeout):
            if settings.path:
                answer = await member.upstream.client.get(member.upstream.url(settings.path), follow_redirects=False)
                if answer.status_code >= 500:
                    return False, f"GET {settings.path}: {answer.status_code}"
            if settings.echo and member.dicom is not None and echo is not None:
                await echo(member, settings.timeout)
    except TimeoutError:
        return False, f"no answer within {settings.timeout:g} s (HealthCheck:TimeoutSeconds)"
    except (httpx.HTTPError, OSError) as e:
        return False, str(e) or type(e).__name__
    except Exception as e:  # a C-ECHO refusal, a DICOM protocol error
        return False, f"C-ECHO: {e}" if settings.echo else str(e)
    return True, None


async def check_loop(member: Member, echo: Echo | None) -> None:
    """Check ``member`` until cancelled (when it retires or the gateway stops)."""
    while True:
        started = time.perf_counter()
        try:
            ok, error = await check_once(member, echo)
        except Exception:
            log.exception("health check of %s failed", member.name)
            ok, error = False, "check crashed"
        member.checked(ok, round((time.perf_counter() - started) * 1000, 1), error)
        await asyncio.sleep(member.check.interval)
