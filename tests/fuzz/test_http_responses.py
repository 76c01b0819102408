"""Hostile HTTP answers from a raw upstream through a real gateway process.

Each example is one plan (:func:`tests.fuzz.http_strategies.responses`: 1xx storms, bad status
lines, conflicting or lying framing, huge heads, a second message in the same write, an early
close, pauses) that the scripted upstream plays for one ``GET``. Properties:

* the client gets either the first answer intact (h11's reading of the upstream's bytes: the same
  status and exactly its body, or a prefix of it when the connection was cut) or a 502/504 JSON;
* never a byte of a second message: a second request on the same client connection gets its own
  answer, intact;
* afterwards another client is served, the RSS stays bounded, the log holds no traceback.
"""

from __future__ import annotations

import json

from hypothesis import example, given

from tests.fuzz.client import Answer, Answers, RawClient, request_once
from tests.fuzz.conftest import Watched
from tests.fuzz.http_strategies import INTERIM, first_response, responses
from tests.fuzz.profiles import fuzz_settings
from tests.fuzz.upstreams import FINE, Plan, ScriptedUpstream

FINE_BODY = FINE.rsplit(b"\r\n\r\n", 1)[1]


def _is_gateway_error(answer: Answer) -> bool:
    if answer.status not in (502, 504) or answer.recorded is not None:
        return False
    if not answer.complete:
        return False
    assert (answer.value(b"content-type") or b"").startswith(b"application/json"), answer
    json.loads(answer.body)
    return True


def _check_first(answer: Answer, plan: Plan) -> None:
    if _is_gateway_error(answer):
        return
    reference = first_response(plan.wire, closed=plan.end == "close")
    assert answer.status == reference.status, f"the client got {answer.status}; h11 reads {reference}"
    if answer.complete:
        assert answer.body == reference.body, "the body is not the first answer's (bytes of another message?)"
        assert reference.complete or reference.error or plan.end == "close", reference
    else:
        assert reference.body.startswith(answer.body), "a cut-off body that is not a prefix of the first answer's"


def run_example(watched: Watched, scripted: ScriptedUpstream, plan: Plan) -> None:
    number = scripted.add(plan)
    port = watched.gateway.http_port
    with RawClient(port, timeout=10) as client:
        client.send([b"GET /plan/%d HTTP/1.1\r\nhost: gateway\r\n\r\n" % number,
                     b"GET /after HTTP/1.1\r\nhost: gateway\r\n\r\n"])
        answers = client.read(Answers([b"GET", b"GET"]))
    assert answers.answers, f"no answer at all: {bytes(answers.raw)[:300]!r}"
    _check_first(answers.answers[0], plan)
    if len(answers.answers) > 1 and answers.answers[1].complete:  # the same client connection, the next request
        second = answers.answers[1]  # a 504 when the plan answered, then hung on the kept-alive connection
        assert _is_gateway_error(second) or (second.status, second.body) == (200, FINE_BODY), \
            f"the second request's answer is not intact: {second}"
    answer = request_once(port, b"GET", b"/fine")
    assert (answer.status, answer.body) == (200, FINE_BODY), answer
    watched.check_rss()
    watched.check_log()


@fuzz_settings(80)
@given(responses())
@example(Plan((b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nokHTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\nsecond",)))
@example(Plan((b"HTTP/1.1 204 No Content\r\ncontent-length: 3\r\n\r\nabc",)))
@example(Plan((INTERIM[2] * 3 + b"HTTP/1.1 204 No Content\r\ntransfer-encoding: gzip\r\n\r\n",)))  # no body at all
@example(Plan((b"HTTP/1.1 999 Weird\r\ncontent-length: 2\r\n\r\nok",)))
@example(Plan((b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc",), "close"))
# Found by this fuzzer: a 304 with a Content-Length made uvicorn raise mid-answer (a traceback per answer).
@example(Plan((b"HTTP/1.1 304 Not Modified\r\ncontent-length: 1\r\n\r\n",)))
def test_hostile_answers_reach_the_client_intact_or_as_502(
    scripted_gateway: Watched, scripted: ScriptedUpstream, plan: Plan,
) -> None:
    run_example(scripted_gateway, scripted, plan)
