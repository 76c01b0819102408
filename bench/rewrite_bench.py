#!/usr/bin/env python3
"""Cost of the streaming URL rewriter (:mod:`dicomproxy.http.rewrite`) on a large DICOMweb answer.

Builds a QIDO-RS instance answer (DICOM JSON, ``--instances`` results, each with its
``RetrieveURL`` and a few attributes, ~0.6 KB per result) and a WADO-RS XML metadata answer
(``multipart/related; type="application/dicom+xml"``, one part per instance with a
``BulkData`` URI), then feeds each in 64 KB chunks, as the proxy gets them:

* ``replace``  every URL names the PACS (a PACS that ignores ``Forwarded``): all rewritten;
* ``scan``     the URLs already name the gateway (``Forwarded`` honoured): searched, nothing changed.

Prints CPU time per MB (process time, best of ``--repeat``) and per answer. Not a test.

    python bench/rewrite_bench.py                    # 5,000 instances
    python bench/rewrite_bench.py --instances 20000
"""

from __future__ import annotations

import argparse
import time

from dicomproxy.http.rewrite import MultipartRewriter, TextRewriter, UrlMap

PACS = b"http://127.0.0.1:8042"
GATEWAY = b"https://gateway.example.org"
CHUNK = 64 << 10


def qido(base: bytes, n: int) -> bytes:
    items = []
    for i in range(n):
        uid = b"1.2.826.0.1.3680043.8.498.%d" % (10**12 + i)
        items.append(b'{"00080016":{"vr":"UI","Value":["1.2.840.10008.5.1.4.1.1.2"]},"00080018":{"vr":"UI","Value":["'
                     + uid + b'"]},"00081190":{"vr":"UR","Value":["' + base + b"/dicom-web/studies/1.2.3/series/1.2.3.4"
                     b'/instances/' + uid + b'"]},"00100010":{"vr":"PN","Value":[{"Alphabetic":"Doe^Jane"}]},'
                     b'"00100020":{"vr":"LO","Value":["PID-%d"]},"00200013":{"vr":"IS","Value":[%d]}}' % (i, i))
    return b"[" + b",".join(items) + b"]"


def xml_metadata(base: bytes, n: int) -> bytes:
    parts = []
    for i in range(n):
        xml = (b'<?xml version="1.0" encoding="UTF-8"?><NativeDicomModel><DicomAttribute tag="00080018" vr="UI">'
               b'<Value number="1">1.2.3.%d</Value></DicomAttribute><DicomAttribute tag="7FE00010" vr="OW">'
               b'<BulkData uri="' % i + base + b'/dicom-web/studies/1.2.3/series/4/instances/%d/bulk/7fe00010"/>'
               b"</DicomAttribute>" % i + b"<DicomAttribute>" + b"x" * 400 + b"</DicomAttribute></NativeDicomModel>")
        parts.append(b"--BOUND\r\nContent-Type: application/dicom+xml\r\nContent-Length: %d\r\n\r\n" % len(xml) + xml
                     + b"\r\n")
    return b"".join(parts) + b"--BOUND--\r\n"


def cpu(make: type, body: bytes, repeat: int) -> float:
    chunks = [body[i:i + CHUNK] for i in range(0, len(body), CHUNK)]
    best = float("inf")
    for _ in range(repeat):
        rewriter = make()
        start = time.process_time()
        for c in chunks:
            rewriter.feed(c)
        rewriter.flush()
        best = min(best, time.process_time() - start)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--instances", type=int, default=5000)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    urls = UrlMap.of(PACS, GATEWAY)
    print("| answer | size | case | CPU ms | ms per MB |\n|---|---|---|---|---|")
    for name, build, make in (
        ("QIDO JSON", qido, lambda: TextRewriter(urls)),
        ("XML metadata multipart", xml_metadata, lambda: MultipartRewriter(urls, b"BOUND")),
    ):
        for case, base in (("replace", PACS), ("scan", GATEWAY)):
            body = build(base, args.instances)
            ms = cpu(make, body, args.repeat) * 1000
            mb = len(body) / 1e6
            print(f"| {name} | {mb:.1f} MB | {case} | {ms:.1f} | {ms / mb:.2f} |")


if __name__ == "__main__":
    main()
