"""TUS protocol conformance: every status code and header of issue 3, as tusd v2 answers them.

The server is the real TusApp under a real uvicorn on a loopback port; requests are real HTTP.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.peers import wait_until
from tests.tus.test_support import (
    OCTET,
    TUS,
    RawRequest,
    TusThreadServer,
    completed_ids,
    raw_request,
    read_info,
    upload_id,
)


@pytest.fixture
def tus(tmp_path: Path) -> Iterator[TusThreadServer]:
    server = TusThreadServer(tmp_path / "uploads", max_size=10_000_000, allow_download=True).start()
    yield server
    server.stop()


def b64(s: str) -> str:
    return base64.b64encode(s.encode()).decode()


def assert_error(r: requests.Response, status: int, code: str) -> None:
    assert r.status_code == status, (r.status_code, r.text)
    assert r.text.startswith(code + ": "), r.text
    assert r.text.endswith("\n")
    assert r.headers["Content-Type"] == "text/plain; charset=utf-8"
    assert r.headers["Tus-Resumable"] == "1.0.0"


# --------------------------------------------------------------------------- OPTIONS, CORS
def test_options_advertises_version_extensions_max_size_and_checksums(tus: TusThreadServer) -> None:
    r = requests.options(tus.url, timeout=10)  # no Tus-Resumable needed for discovery
    assert r.status_code == 200  # tusd: 200, not 204 (browsers' preflight)
    assert r.headers["Tus-Version"] == "1.0.0"
    assert r.headers["Tus-Resumable"] == "1.0.0"
    assert r.headers["Tus-Max-Size"] == "10000000"
    ext = r.headers["Tus-Extension"].split(",")
    for name in ("creation", "creation-with-upload", "creation-defer-length", "termination", "expiration",
                 "checksum", "concatenation"):
        assert name in ext
    assert set(r.headers["Tus-Checksum-Algorithm"].split(",")) >= {"sha1", "md5", "sha256"}
    assert r.headers["X-Content-Type-Options"] == "nosniff"


def test_cors_preflight_and_exposed_headers(tus: TusThreadServer) -> None:
    origin = "https://viewer.example.org"
    pre = requests.options(tus.url, headers={"Origin": origin, "Access-Control-Request-Method": "PATCH"},
                           timeout=10)
    assert pre.status_code == 200
    assert pre.headers["Access-Control-Allow-Origin"] == origin
    assert "Origin" in pre.headers["Vary"]
    methods = {m.strip() for m in pre.headers["Access-Control-Allow-Methods"].split(",")}
    assert methods >= {"POST", "HEAD", "PATCH", "OPTIONS", "GET", "DELETE"}
    allowed = {h.strip().lower() for h in pre.headers["Access-Control-Allow-Headers"].split(",")}
    assert allowed >= {"tus-resumable", "upload-length", "upload-offset", "upload-metadata", "upload-concat",
                       "upload-defer-length", "upload-checksum", "content-type", "x-http-method-override",
                       "authorization"}
    assert int(pre.headers["Access-Control-Max-Age"]) > 0
    r = requests.post(tus.url, headers={**TUS, "Upload-Length": "3", "Origin": origin}, timeout=10)
    assert r.status_code == 201
    assert r.headers["Access-Control-Allow-Origin"] == origin
    exposed = {h.strip().lower() for h in r.headers["Access-Control-Expose-Headers"].split(",")}
    assert exposed >= {"location", "upload-offset", "upload-length", "upload-metadata", "upload-expires",
                       "tus-version", "tus-resumable", "tus-max-size", "tus-extension", "upload-concat",
                       "upload-defer-length"}


# --------------------------------------------------------------------------- POST
def test_post_creates_upload_with_absolute_location_and_tusd_info(tus: TusThreadServer) -> None:
    meta = f"filename {b64('study.zip')},patient {b64('Doe^Jöhn')},flag"
    r = requests.post(tus.url, headers={**TUS, "Upload-Length": "11", "Upload-Metadata": meta}, timeout=10)
    assert r.status_code == 201
    loc = r.headers["Location"]
    assert re.fullmatch(rf"http://127\.0\.0\.1:{tus.port}/files/[0-9a-f]{{32}}", loc), loc
    assert r.headers["Tus-Resumable"] == "1.0.0"
    expires = r.headers["Upload-Expires"]
    assert expires.endswith(" GMT")
    uid = upload_id(loc)
    info = read_info(tus.folder, uid)
    assert list(info) == ["ID", "Size", "SizeIsDeferred", "Offset", "MetaData", "IsPartial", "IsFinal",
                          "PartialUploads", "Storage"]
    assert info["ID"] == uid and info["Size"] == 11 and info["SizeIsDeferred"] is False and info["Offset"] == 0
    assert info["MetaData"] == {"filename": "study.zip", "patient": "Doe^Jöhn", "flag": ""}
    assert info["IsPartial"] is False and info["IsFinal"] is False and info["PartialUploads"] is None
    assert info["Storage"] == {"Type": "filestore", "Path": str(tus.folder / uid),
                               "InfoPath": str(tus.folder / f"{uid}.info")}
    assert (tus.folder / uid).read_bytes() == b""


def test_location_honours_forwarded_headers(tus: TusThreadServer) -> None:
    r = requests.post(tus.url, headers={**TUS, "Upload-Length": "1", "X-Forwarded-Host": "pacs.example.org",
                                        "X-Forwarded-Proto": "https"}, timeout=10)
    assert re.fullmatch(r"https://pacs\.example\.org/files/[0-9a-f]{32}", r.headers["Location"])
    r = requests.post(tus.url, headers={**TUS, "Upload-Length": "1",
                                        "Forwarded": 'for=1.2.3.4;host="gw.example.net:8443";proto=https'},
                      timeout=10)
    assert r.headers["Location"].startswith("https://gw.example.net:8443/files/")
    r = requests.post(tus.url, headers={**TUS, "Upload-Length": "1", "X-Forwarded-Host": "h.example:80"},
                      timeout=10)
    assert r.headers["Location"].startswith("http://h.example/files/")  # default port dropped


@pytest.mark.parametrize("version", [None, "0.2.2", "2.0.0", ""])
def test_unsupported_version_is_412_with_tus_version(tus: TusThreadServer, version: str | None) -> None:
    hdrs = {"Upload-Length": "5"}
    if version is not None:
        hdrs["Tus-Resumable"] = version
    r = requests.post(tus.url, headers=hdrs, timeout=10)
    assert_error(r, 412, "ERR_UNSUPPORTED_VERSION")
    assert r.headers["Tus-Version"] == "1.0.0"
    assert not list(tus.folder.glob("*.info"))


@pytest.mark.parametrize("length", ["", "-1", "abc", "1.5", "5x", "0x10", "1_0", "99999999999999999999999"])
def test_malformed_upload_length_is_400(tus: TusThreadServer, length: str) -> None:
    hdrs = dict(TUS)
    if length:
        hdrs["Upload-Length"] = length
    assert_error(requests.post(tus.url, headers=hdrs, timeout=10), 400, "ERR_INVALID_UPLOAD_LENGTH")


def test_length_header_combinations(tus: TusThreadServer) -> None:
    r = requests.post(tus.url, headers={**TUS, "Upload-Length": "5", "Upload-Defer-Length": "1"}, timeout=10)
    assert_error(r, 400, "ERR_AMBIGUOUS_UPLOAD_LENGTH")
    r = requests.post(tus.url, headers={**TUS, "Upload-Defer-Length": "2"}, timeout=10)
    assert_error(r, 400, "ERR_INVALID_UPLOAD_LENGTH_DEFER")
    r = requests.post(tus.url, headers={**TUS, "Upload-Length": "10000001"}, timeout=10)
    assert_error(r, 413, "ERR_MAX_SIZE_EXCEEDED")
    assert requests.post(tus.url, headers={**TUS, "Upload-Length": "10000000"}, timeout=10).status_code == 201


def test_metadata_empty_valid_and_malformed_elements(tus: TusThreadServer) -> None:
    # tuspy always sends the header, empty when there is no metadata: that is valid.
    url = tus.create(0, {"Upload-Metadata": ""})
    assert "Upload-Metadata" not in tus.head(url).headers
    # Malformed elements are dropped one by one (tusd's ParseMetadataHeader); good ones stay.
    bad = ",".join([f"good {b64('yes')}", "toomany a b", "notb64 !!!", f" spaced {b64('ok')} ",
                    "unpadded eWU", "", f"unicode {b64('é✓')}", " "])
    url = tus.create(1, {"Upload-Metadata": bad})
    head = tus.head(url)
    pairs = dict(p.split(" ") if " " in p else (p, "") for p in head.headers["Upload-Metadata"].split(","))
    assert {k: base64.b64decode(v).decode() for k, v in pairs.items()} == {
        "good": "yes", "spaced": "ok", "unicode": "é✓"}


def test_creation_with_upload(tus: TusThreadServer) -> None:
    r = requests.post(tus.url, data=b"hello", headers={**TUS, "Upload-Length": "8", "Content-Type": OCTET},
                      timeout=10)
    assert r.status_code == 201
    assert r.headers["Upload-Offset"] == "5"
    assert tus.head(r.headers["Location"]).headers["Upload-Offset"] == "5"
    # A body with another Content-Type is ignored, as tusd does.
    r = requests.post(tus.url, data=b"hello", headers={**TUS, "Upload-Length": "8"}, timeout=10)
    assert r.status_code == 201 and "Upload-Offset" not in r.headers
    assert tus.head(r.headers["Location"]).headers["Upload-Offset"] == "0"


def test_empty_upload_completes_at_creation(tus: TusThreadServer) -> None:
    url = tus.create(0)
    assert completed_ids(tus) == [upload_id(url)]
    assert "Upload-Expires" not in tus.head(url).headers  # finished uploads do not expire


# --------------------------------------------------------------------------- HEAD
def test_head_reports_offset_length_metadata_no_store(tus: TusThreadServer) -> None:
    url = tus.create(10, {"Upload-Metadata": f"filename {b64('a.dcm')}"})
    assert tus.patch(url, 0, b"1234").status_code == 204
    r = requests.head(url, timeout=10)  # no Tus-Resumable needed on HEAD
    assert r.status_code == 200
    assert r.headers["Cache-Control"] == "no-store"
    assert r.headers["Upload-Offset"] == "4"
    assert r.headers["Upload-Length"] == "10"
    assert r.headers["Upload-Metadata"] == f"filename {b64('a.dcm')}"
    assert r.headers["Upload-Expires"].endswith("GMT")
    assert r.content == b""


def test_not_found_and_id_traversal(tus: TusThreadServer, tmp_path: Path) -> None:
    # A perfectly valid upload just outside the folder: no request may reach it.
    (tmp_path / "victim").write_bytes(b"secret")
    (tmp_path / "victim.info").write_text(json.dumps({"ID": "victim", "Size": 10, "MetaData": {}}))
    r = requests.head(tus.url + "0123456789abcdef0123456789abcdef", headers=TUS, timeout=10)
    assert r.status_code == 404 and r.content == b""
    for path in ("/files/../victim", "/files/..%2Fvictim", "/files/%2e%2e%2fvictim", "/files/a/../../victim",
                 "/files/victim.info", "/files/..", "/files/.%2e/victim"):
        for method, body in (("HEAD", b""), ("PATCH", b"xxxx"), ("DELETE", b""), ("GET", b"")):
            hdrs = {**TUS, "Content-Type": OCTET, "Upload-Offset": "6"}
            status, _, text = raw_request(tus.port, method, path, hdrs, body)
            assert status == 404, (method, path, status, text)
            if method != "HEAD":
                assert text.startswith(b"ERR_UPLOAD_NOT_FOUND: "), (method, path, text)
    assert (tmp_path / "victim").read_bytes() == b"secret"
    assert (tmp_path / "victim.info").exists()
    assert not list(tmp_path.glob("victim.lock")) and not list(tmp_path.glob("*.stop"))


# --------------------------------------------------------------------------- PATCH
def test_patch_appends_and_answers_204_with_offset(tus: TusThreadServer) -> None:
    url = tus.create(10)
    r = tus.patch(url, 0, b"01234")
    assert r.status_code == 204 and r.headers["Upload-Offset"] == "5" and r.content == b""
    assert r.headers["Upload-Expires"].endswith("GMT")
    r = tus.patch(url, 5, b"56789")
    assert r.status_code == 204 and r.headers["Upload-Offset"] == "10"
    assert "Upload-Expires" not in r.headers
    assert (tus.folder / upload_id(url)).read_bytes() == b"0123456789"
    assert completed_ids(tus) == [upload_id(url)]
    # A PATCH to a finished upload at its end offset changes nothing (tusd answers 204).
    r = tus.patch(url, 10, b"")
    assert r.status_code == 204 and r.headers["Upload-Offset"] == "10"


@pytest.mark.parametrize("ctype", [None, "application/octet-stream", "text/plain",
                                   "application/offset+octet-stream; charset=utf-8"])
def test_patch_wrong_content_type_is_400(tus: TusThreadServer, ctype: str | None) -> None:
    url = tus.create(4)
    hdrs = {**TUS, "Upload-Offset": "0"}
    if ctype:
        hdrs["Content-Type"] = ctype
    assert_error(requests.patch(url, data=b"abcd", headers=hdrs, timeout=10), 400, "ERR_INVALID_CONTENT_TYPE")


@pytest.mark.parametrize("offset", [None, "", "-1", "abc", "1.0", "0x0", "1 2", "1_0"])
def test_patch_malformed_offset_is_400(tus: TusThreadServer, offset: str | None) -> None:
    url = tus.create(4)
    hdrs = {**TUS, "Content-Type": OCTET}
    if offset is not None:
        hdrs["Upload-Offset"] = offset
    assert_error(requests.patch(url, data=b"abcd", headers=hdrs, timeout=10), 400, "ERR_INVALID_OFFSET")


def test_patch_offset_mismatch_is_409_with_server_offset(tus: TusThreadServer) -> None:
    url = tus.create(10)
    tus.patch(url, 0, b"abc")
    r = tus.patch(url, 1, b"xyz")
    assert_error(r, 409, "ERR_MISMATCHED_OFFSET")
    assert r.headers["Upload-Offset"] == "3"
    assert (tus.folder / upload_id(url)).read_bytes() == b"abc"


def test_patch_body_longer_than_declared(tus: TusThreadServer) -> None:
    url = tus.create(5)
    # Content-Length beyond Upload-Length: refused before a byte is read.
    assert_error(tus.patch(url, 0, b"0123456"), 413, "ERR_UPLOAD_SIZE_EXCEEDED")
    assert (tus.folder / upload_id(url)).read_bytes() == b""
    # Chunked body (no Content-Length) that runs past the end: stored up to the length, then 413.
    r = requests.patch(url, data=iter([b"012", b"3456", b"789"]), timeout=10,
                       headers={**TUS, "Content-Type": OCTET, "Upload-Offset": "0"})
    assert_error(r, 413, "ERR_UPLOAD_SIZE_EXCEEDED")
    assert (tus.folder / upload_id(url)).read_bytes() == b"01234"


def test_patch_to_final_upload_is_403_and_unknown_is_404(tus: TusThreadServer) -> None:
    part = tus.create(3, {"Upload-Concat": "partial"})
    tus.patch(part, 0, b"abc")
    final = tus.create(headers={"Upload-Concat": f"final;{part}"})
    assert_error(tus.patch(final, 3, b"x"), 403, "ERR_MODIFY_FINAL")
    r = requests.post(tus.url, data=b"x", headers={**TUS, "Content-Type": OCTET, "Upload-Concat": f"final;{part}"},
                      timeout=10)
    assert_error(r, 403, "ERR_MODIFY_FINAL")
    assert_error(tus.patch(tus.url + "f" * 32, 0, b"x"), 404, "ERR_UPLOAD_NOT_FOUND")


def test_x_http_method_override(tus: TusThreadServer) -> None:
    url = tus.create(4)
    r = requests.post(url, data=b"abcd", timeout=10, headers={
        **TUS, "X-HTTP-Method-Override": "PATCH", "Content-Type": OCTET, "Upload-Offset": "0"})
    assert r.status_code == 204 and r.headers["Upload-Offset"] == "4"
    r = requests.post(url, headers={**TUS, "X-HTTP-Method-Override": "HEAD"}, timeout=10)
    assert r.status_code == 200 and r.headers["Upload-Offset"] == "4"
    r = requests.post(url, headers={**TUS, "X-HTTP-Method-Override": "DELETE"}, timeout=10)
    assert r.status_code == 204
    assert tus.head(url).status_code == 404


def test_method_not_allowed(tus: TusThreadServer) -> None:
    r = requests.put(tus.url, headers=TUS, timeout=10)
    assert r.status_code == 405 and r.headers["Allow"] == "POST"
    url = tus.create(1)
    r = requests.put(url, headers=TUS, timeout=10)
    assert r.status_code == 405 and r.headers["Allow"] == "GET, HEAD, PATCH, DELETE"


# --------------------------------------------------------------------------- termination, GET
def test_delete_then_404(tus: TusThreadServer) -> None:
    url = tus.create(4)
    tus.patch(url, 0, b"ab")
    r = requests.delete(url, headers=TUS, timeout=10)
    assert r.status_code == 204
    uid = upload_id(url)
    assert not (tus.folder / uid).exists() and not (tus.folder / f"{uid}.info").exists()
    assert tus.head(url).status_code == 404
    assert_error(tus.patch(url, 2, b"cd"), 404, "ERR_UPLOAD_NOT_FOUND")
    assert_error(requests.delete(url, headers=TUS, timeout=10), 404, "ERR_UPLOAD_NOT_FOUND")


def test_get_downloads_what_was_stored(tus: TusThreadServer) -> None:
    url = tus.create(6, {"Upload-Metadata": f"filename {b64('x.html')},filetype {b64('text/html')}"})
    assert requests.get(url, timeout=10).status_code == 204  # nothing yet
    tus.patch(url, 0, b"<b>hi")
    r = requests.get(url, timeout=10)
    assert r.status_code == 200 and r.content == b"<b>hi"
    assert r.headers["Content-Disposition"].startswith("attachment")  # never rendered inline


# --------------------------------------------------------------------------- defer-length
def test_deferred_length(tus: TusThreadServer) -> None:
    url = tus.create(headers={"Upload-Defer-Length": "1"})
    head = tus.head(url)
    assert head.headers["Upload-Defer-Length"] == "1" and "Upload-Length" not in head.headers
    assert tus.patch(url, 0, b"abc").status_code == 204
    assert_error(tus.patch(url, 3, b"d", {"Upload-Length": "2"}), 400, "ERR_INVALID_UPLOAD_LENGTH")
    assert_error(tus.patch(url, 3, b"d", {"Upload-Length": "x"}), 400, "ERR_INVALID_UPLOAD_LENGTH")
    r = tus.patch(url, 3, b"def", {"Upload-Length": "6"})
    assert r.status_code == 204 and r.headers["Upload-Offset"] == "6"
    assert tus.head(url).headers["Upload-Length"] == "6"
    assert read_info(tus.folder, upload_id(url))["SizeIsDeferred"] is False
    assert completed_ids(tus) == [upload_id(url)]
    # Upload-Length on an upload whose length is known: 400 (tusd).
    url2 = tus.create(4)
    assert_error(tus.patch(url2, 0, b"ab", {"Upload-Length": "4"}), 400, "ERR_INVALID_UPLOAD_LENGTH")


# --------------------------------------------------------------------------- checksum
@pytest.mark.parametrize("algo", ["sha1", "md5", "sha256", "sha512"])
def test_checksum_match_and_mismatch(tus: TusThreadServer, algo: str) -> None:
    url = tus.create(8)
    good = base64.b64encode(hashlib.new(algo, b"abcd").digest()).decode()
    r = tus.patch(url, 0, b"abcd", {"Upload-Checksum": f"{algo} {good}"})
    assert r.status_code == 204 and r.headers["Upload-Offset"] == "4"
    r = tus.patch(url, 4, b"efgh", {"Upload-Checksum": f"{algo} {good}"})
    assert_error(r, 460, "ERR_CHECKSUM_MISMATCH")
    assert tus.head(url).headers["Upload-Offset"] == "4"  # the chunk was discarded
    assert (tus.folder / upload_id(url)).read_bytes() == b"abcd"
    assert not list(tus.folder.glob("*.chk"))


def test_checksum_header_errors(tus: TusThreadServer) -> None:
    url = tus.create(8)
    assert_error(tus.patch(url, 0, b"ab", {"Upload-Checksum": "crc99 AAAA"}), 400,
                 "ERR_UNSUPPORTED_CHECKSUM_ALGORITHM")
    assert_error(tus.patch(url, 0, b"ab", {"Upload-Checksum": "sha1"}), 400, "ERR_INVALID_CHECKSUM")
    assert_error(tus.patch(url, 0, b"ab", {"Upload-Checksum": "sha1 not*base64"}), 400, "ERR_INVALID_CHECKSUM")
    assert tus.head(url).headers["Upload-Offset"] == "0"


# --------------------------------------------------------------------------- concatenation
def test_concatenation(tus: TusThreadServer) -> None:
    a = tus.create(3, {"Upload-Concat": "partial"})
    b = tus.create(4, {"Upload-Concat": "partial", "Upload-Metadata": f"filename {b64('b')}"})
    assert tus.head(a).headers["Upload-Concat"] == "partial"
    tus.patch(a, 0, b"abc")
    assert_error(requests.post(tus.url, headers={**TUS, "Upload-Concat": f"final;{a} {b}"}, timeout=10), 400,
                 "ERR_UPLOAD_NOT_FINISHED")
    tus.patch(b, 0, b"defg")
    # Partial uploads are not "files". Completions run as tasks in the order uploads finish, so
    # once a whole upload finished after them has been handed over, theirs would have been too.
    marker = tus.create(1)
    tus.patch(marker, 0, b"m")
    assert completed_ids(tus) == [upload_id(marker)]
    tus.completed.clear()
    # Relative paths work as well as absolute URLs (tusd cuts at the base path).
    rel_b = "/files/" + upload_id(b)
    r = requests.post(tus.url, headers={**TUS, "Upload-Concat": f"final;{a} {rel_b}",
                                        "Upload-Metadata": f"filename {b64('ab.zip')}"}, timeout=10)
    assert r.status_code == 201
    final = r.headers["Location"]
    head = tus.head(final)
    assert head.headers["Upload-Length"] == "7" and head.headers["Upload-Offset"] == "7"
    assert head.headers["Upload-Concat"] == f"final;{a} {b}"
    assert (tus.folder / upload_id(final)).read_bytes() == b"abcdefg"
    info = read_info(tus.folder, upload_id(final))
    assert info["IsFinal"] is True and info["PartialUploads"] == [upload_id(a), upload_id(b)]
    assert completed_ids(tus) == [upload_id(final)]
    assert tus.completed[0].metadata == {"filename": "ab.zip"}


@pytest.mark.parametrize("header", ["final;", "final", "bogus", "partial;x", "final; "])
def test_malformed_concat_is_400(tus: TusThreadServer, header: str) -> None:
    r = requests.post(tus.url, headers={**TUS, "Upload-Length": "1", "Upload-Concat": header}, timeout=10)
    assert_error(r, 400, "ERR_INVALID_CONCAT")


def test_concat_of_unknown_or_non_partial(tus: TusThreadServer) -> None:
    r = requests.post(tus.url, headers={**TUS, "Upload-Concat": f"final;{tus.url}{'a' * 32}"}, timeout=10)
    assert_error(r, 404, "ERR_UPLOAD_NOT_FOUND")
    r = requests.post(tus.url, headers={**TUS, "Upload-Concat": "final;http://elsewhere/x/abc"}, timeout=10)
    assert_error(r, 404, "ERR_UPLOAD_NOT_FOUND")
    whole = tus.create(1)
    tus.patch(whole, 0, b"x")
    r = requests.post(tus.url, headers={**TUS, "Upload-Concat": f"final;{whole}"}, timeout=10)
    assert_error(r, 400, "ERR_INVALID_CONCAT")


# --------------------------------------------------------------------------- interruption
def test_disconnect_keeps_received_bytes(tus: TusThreadServer) -> None:
    url = tus.create(1_000_000)
    req = RawRequest(tus.port, "PATCH", "/files/" + upload_id(url),
                     {**TUS, "Content-Type": OCTET, "Upload-Offset": "0", "Content-Length": "1000000"})
    req.send(b"x" * 300_000)
    time.sleep(0.3)  # the server reads the bytes (it writes them in batches: nothing to watch)
    req.close()
    wait_until(lambda: tus.head(url).headers["Upload-Offset"] == "300000", what="the offset after the disconnect")
    assert tus.patch(url, 300_000, b"y" * 700_000).status_code == 204
    assert (tus.folder / upload_id(url)).read_bytes() == b"x" * 300_000 + b"y" * 700_000


def test_new_request_interrupts_a_stalled_patch(tus: TusThreadServer) -> None:
    """tusd's lock semantics: a HEAD (a client reconnecting) makes the stalled PATCH let go."""
    url = tus.create(1_000_000)
    path = "/files/" + upload_id(url)
    stalled = RawRequest(tus.port, "PATCH", path,
                         {**TUS, "Content-Type": OCTET, "Upload-Offset": "0", "Content-Length": "1000000"})
    try:
        stalled.send(b"a" * 200_000)
        time.sleep(0.3)  # the server reads the bytes (it writes them in batches: nothing to watch)
        t0 = time.monotonic()
        head = tus.head(url)
        assert head.status_code == 200 and time.monotonic() - t0 < 5
        assert head.headers["Upload-Offset"] == "200000"  # what it had was saved
        status, _, body = stalled.response()
        assert status == 400 and body.startswith(b"ERR_UPLOAD_INTERRUPTED: ")
    finally:
        stalled.close()


def test_second_concurrent_patch_never_corrupts(tus: TusThreadServer) -> None:
    url = tus.create(600_000)
    path = "/files/" + upload_id(url)
    first = RawRequest(tus.port, "PATCH", path,
                       {**TUS, "Content-Type": OCTET, "Upload-Offset": "0", "Content-Length": "600000"})
    try:
        first.send(b"1" * 250_000)
        time.sleep(0.3)  # the server reads the bytes (it writes them in batches: nothing to watch)
        second = tus.patch(url, 0, b"2" * 600_000)  # same offset: it asks the first to let go
        assert_error(second, 409, "ERR_MISMATCHED_OFFSET")
        assert second.headers["Upload-Offset"] == "250000"
        assert first.response()[0] == 400
    finally:
        first.close()
    assert (tus.folder / upload_id(url)).read_bytes() == b"1" * 250_000
    assert tus.patch(url, 250_000, b"3" * 350_000).status_code == 204
    assert (tus.folder / upload_id(url)).read_bytes() == b"1" * 250_000 + b"3" * 350_000
