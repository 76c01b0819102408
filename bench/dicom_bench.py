"""DICOM storage benchmark: dcmtk storescu straight to Orthanc vs through the gateway, in relay
mode and in store-and-forward mode, in the same rounds.

    python bench/dicom_bench.py [--instances 500] [--rounds 3] [--studies 1] [--nagle]
                                [--modes relay,spool] [--baseline /work/baseline] [--size 16]
                                [--big-mb 300] [--tls] [--baseline-mode spool] [--routes 10]

One run starts a real Orthanc (DICOMweb plugin, as in the tests) and one gateway process per
mode (``Logging:Level`` INFO): ``relay`` is ``Dicom:StoreMode`` ``RelayOrSpool`` (each C-STORE
relayed to Orthanc and answered with Orthanc's status), ``spool`` is ``StoreAndForward`` (every
instance spooled with fsync before storescu hears success, forwarded by the forwarder). Rounds
run direct, then the gateways in rotating order, so all see the same machine load. Each round
stores fresh instances (new UIDs: Orthanc never short-cuts a known instance). ``--big-mb N``
then sends one N MB instance through each gateway and reports the growth of its peak RSS.

Figures per round:

* direct: instances / storescu wall time (Orthanc stores synchronously);
* gateway accept: instances / storescu wall time through the gateway (what the modality sees);
* gateway end-to-end: instances / time until Orthanc holds all of them (spool + forward);
* CPU: the gateway process's user + system CPU per instance over the round (receive, spool,
  forward), from /proc.

The ratios compare each gateway figure with the direct one of the same round; the summary
prints the medians. ``--baseline DIR`` runs another gateway from another checkout (``DIR``,
with its own ``DIR/.venv``, its own defaults) in the same rounds, for before/after figures under
the same machine load. In relay mode accept and end-to-end are the same thing: storescu hears
success only once Orthanc has the instance.

``--baseline-mode`` is the baseline's ``Dicom:StoreMode`` (``relay`` or ``spool``; default relay).
``--routes N`` gives this checkout's gateways N ``Dicom:Routes`` that never match (a calling AE
and a Modality condition each, so every instance's header is read for them and every route is
tried) before the default: the cost of evaluating N routes per instance.

``--adjacent`` stores a fresh direct batch right before each gateway batch and takes that
gateway's ratio against it: on a machine shared with other jobs the load changes within a round
(direct rates swung 175-416 instances/s between rounds here), and a direct figure measured one or
two batches earlier then says more about the load than about the gateway.

``--tls`` opens each gateway's DICOM TLS port too (``Dicom:Tls``, certificates from a private CA
made for the run, client certificates required) and stores one more batch per round through it
with ``storescu +tls`` (the ``relay-tls`` / ``spool-tls`` rows: the same gateway process as the
plain row, so its CPU per instance compares directly), in the same rotating order.

storescu runs with ``TCP_NODELAY=1`` (dcmtk's switch for disabling Nagle): with Nagle on,
storescu itself stalls ~40 ms per instance on delayed ACKs and both paths measure the client,
not the servers. ``--nagle`` measures that setting anyway.

Not a pytest test: it prints a table and exits 0 (1 if an instance went missing).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pydicom.uid import generate_uid  # noqa: E402

from tests import dicom_samples  # noqa: E402
from tests.peers import GatewayProcess, OrthancServer, dcmtk, free_port  # noqa: E402
from tests.tls_certs import TestCa  # noqa: E402


def baseline_gateway(checkout: Path, workdir: Path, orthanc: OrthancServer, settings: dict[str, Any]) -> GatewayProcess:
    """The gateway of another checkout, run by that checkout's own interpreter."""
    gateway = GatewayProcess(workdir, orthanc=orthanc, settings=settings)
    gateway.python = str(checkout / ".venv" / "bin" / "python")
    gateway.repo_root = checkout
    # a checkout from before the shutdown deadline refuses the harness's Server:ShutdownTimeoutSeconds
    gateway.settings.get("Server", {}).pop("ShutdownTimeoutSeconds", None)
    gateway.update_settings({})
    return gateway


def cpu_seconds(gateway: GatewayProcess) -> float:
    """User + system CPU of the gateway process so far."""
    assert gateway.proc is not None
    fields = Path(f"/proc/{gateway.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def make_batch(folder: Path, n: int, studies: int, tag: str, size: int = 16) -> Path:
    folder.mkdir(parents=True)
    study_uids = [generate_uid() for _ in range(studies)]
    series_uids = [generate_uid() for _ in range(studies)]
    for i in range(n):
        s = i % studies
        dicom_samples.make_instance(
            folder / f"IM{i:05d}.dcm",
            patient_id=f"BENCH-{tag}-{s}",
            patient_name=f"Bench^{tag}",
            study_uid=study_uids[s],
            series_uid=series_uids[s],
            InstanceNumber=i + 1,
            size=(size, size),
        )
    return folder


def storescu(aet: str, port: int, folder: Path, nagle: bool, extra: tuple[str, ...] = ()) -> float:
    env = dict(os.environ)
    if not nagle:
        env["TCP_NODELAY"] = "1"
    started = time.perf_counter()
    proc = subprocess.run(
        [dcmtk("storescu"), *extra, "-aec", aet, "127.0.0.1", str(port), str(folder),
         *(["+sd"] if folder.is_dir() else [])],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    elapsed = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"storescu failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return elapsed


def wait_count(orthanc: OrthancServer, count: int, timeout: float = 300) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if orthanc.instance_count() >= count:
            return time.perf_counter()
        time.sleep(0.02)
    raise SystemExit(f"Orthanc holds {orthanc.instance_count()} instances, expected {count}")


def tls_setup(folder: Path) -> tuple[dict[str, Any], tuple[str, ...]]:
    """``Dicom:Tls`` for the gateway and storescu's ``+tls`` arguments, from a CA made here."""
    ca = TestCa.create(folder)
    server, client = ca.issue("gateway", ["127.0.0.1"]), ca.issue("modality", client=True)
    settings = {"Enabled": True, "Port": free_port(), "Certificate": str(server.cert_path),
                "Key": str(server.key_path), "ClientCa": str(ca.cert_path)}
    return settings, ("+tls", str(client.key_path), str(client.cert_path), "+cf", str(ca.cert_path))


def run_gateway(
    gateway: GatewayProcess, orthanc: OrthancServer, folder: Path, expected: int, n: int, nagle: bool,
    port: int | None = None, extra: tuple[str, ...] = (),
) -> tuple[float, float, float]:
    """(accept/s, end-to-end/s, CPU ms per instance) of one batch through ``gateway``."""
    cpu = cpu_seconds(gateway)
    started = time.perf_counter()
    t_accept = storescu(gateway.aet, port or gateway.dicom_port, folder, nagle, extra)
    t_e2e = wait_count(orthanc, expected) - started
    time.sleep(0.2)  # the forwarder's last callbacks
    return n / t_accept, n / t_e2e, (cpu_seconds(gateway) - cpu) * 1000 / n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--instances", type=int, default=500)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--studies", type=int, default=1, help="spread the instances over this many studies")
    ap.add_argument("--size", type=int, default=16, help="rows and columns of each CT image (16: ~1 KB of pixels)")
    ap.add_argument("--forward-concurrency", type=int, default=None, help="Dicom:ForwardConcurrency (default: 4)")
    ap.add_argument("--baseline", type=Path, default=None, help="also run the gateway of this checkout (its .venv)")
    ap.add_argument("--modes", default="relay,spool", help="gateway modes to run: relay, spool (comma-separated)")
    ap.add_argument("--big-mb", type=int, default=0, help="then one instance of this many MB through each gateway")
    ap.add_argument("--nagle", action="store_true", help="run storescu with Nagle on (dcmtk's default)")
    ap.add_argument("--tls", action="store_true", help="also store through the gateway's DICOM TLS port")
    ap.add_argument("--baseline-mode", default="relay", help="the baseline's mode: relay or spool")
    ap.add_argument("--routes", type=int, default=0, help="N never-matching Dicom:Routes (this checkout)")
    ap.add_argument("--adjacent", action="store_true",
                    help="a direct batch right before each gateway batch: each ratio against its own direct one")
    ap.add_argument(
        "--orthanc-nagle", action="store_true", help="leave Nagle on in Orthanc (its DCMTK default: ~20 instances/s)"
    )
    args = ap.parse_args()
    if not args.orthanc_nagle:
        # Orthanc's DCMTK reads the same switch; without it each C-STORE answer waits ~40 ms on a
        # delayed ACK and Orthanc, not the gateway, is what both paths measure.
        os.environ["TCP_NODELAY"] = "1"

    with tempfile.TemporaryDirectory(prefix="dicom-bench-") as tmp_name:
        tmp = Path(tmp_name)
        orthanc = OrthancServer(tmp / "orthanc").start()
        settings: dict[str, Any] = {"Logging": {"Level": "INFO"}, "Dicom": {}}
        if args.forward_concurrency:
            settings["Dicom"]["ForwardConcurrency"] = args.forward_concurrency
        tls: dict[str, Any] = {}
        tls_extra: tuple[str, ...] = ()
        if args.tls:
            tls, tls_extra = tls_setup(tmp / "pki")
        gateways: dict[str, GatewayProcess] = {}
        tls_ports: dict[str, int] = {}  # gateway name -> its Dicom:Tls:Port
        for mode in args.modes.split(","):
            store_mode = {"relay": "RelayOrSpool", "spool": "StoreAndForward"}[mode.strip()]
            mine = {**settings, "Dicom": {**settings["Dicom"], "StoreMode": store_mode}}
            if args.routes:
                mine["Dicom"]["Routes"] = [{"CallingAet": f"NOPE{i}", "Modality": "XX", "Destinations": ["default"]}
                                           for i in range(args.routes)]
            if tls:
                tls_ports[mode.strip()] = free_port()
                mine["Dicom"]["Tls"] = {**tls, "Port": tls_ports[mode.strip()]}
            gateways[mode.strip()] = GatewayProcess(tmp / mode.strip(), orthanc=orthanc, settings=mine)
        if args.baseline:
            base_mode = {"relay": "RelayOrSpool", "spool": "StoreAndForward"}[args.baseline_mode]
            base = {**settings, "Dicom": {**settings["Dicom"], "StoreMode": base_mode}}
            gateways = {"baseline": baseline_gateway(args.baseline, tmp / "baseline", orthanc, base), **gateways}
        rows: list[tuple[int, str, float, float, float, float]] = []
        big: dict[str, tuple[float, float]] = {}
        try:
            for g in gateways.values():
                g.start()
            expected = 0
            n = args.instances
            for r in range(1, args.rounds + 1):
                direct_dir = make_batch(tmp / f"direct{r}", n, args.studies, f"D{r}", args.size)
                t_direct = storescu(orthanc.aet, orthanc.dicom_port, direct_dir, args.nagle)
                expected += n
                wait_count(orthanc, expected)
                order: list[tuple[str, GatewayProcess, int | None, tuple[str, ...]]] = [
                    (name, g, None, ()) for name, g in gateways.items()]
                order += [(f"{name}-tls", gateways[name], port, tls_extra) for name, port in tls_ports.items()]
                shift = (r - 1) % len(order)
                order = order[shift:] + order[:shift]  # rotating: no gateway always runs right after direct
                for name, g, port, extra in order:
                    folder = make_batch(tmp / f"{name}{r}", n, args.studies, f"{name[0].upper()}{name[-1]}{r}",
                                        args.size)
                    if args.adjacent:  # the load a few seconds from now, not at the round's start
                        again = make_batch(tmp / f"direct{r}-{name}", n, args.studies, f"D{r}{name[0]}", args.size)
                        t_direct = storescu(orthanc.aet, orthanc.dicom_port, again, args.nagle)
                        expected += n
                        wait_count(orthanc, expected)
                    expected += n
                    accept, e2e, cpu = run_gateway(g, orthanc, folder, expected, n, args.nagle, port, extra)
                    rows.append((r, name, n / t_direct, accept, e2e, cpu))
            if args.big_mb:
                for name, g in gateways.items():
                    expected += 1
                    big[name] = big_instance(g, orthanc, tmp / f"big-{name}.dcm", args.big_mb, expected)
        finally:
            for g in gateways.values():
                g.stop()
            orthanc.stop()
    report(args, rows)
    for name, (grown, seconds) in big.items():
        print(f"{args.big_mb} MB instance through {name}: peak RSS +{grown:.0f} MB, {seconds:.1f} s to Orthanc")
    return 0


def peak_rss_mb(gateway: GatewayProcess) -> float:
    assert gateway.proc is not None
    status = Path(f"/proc/{gateway.proc.pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1]) / 1024


def big_instance(gateway: GatewayProcess, orthanc: OrthancServer, path: Path, mb: int, expected: int
                 ) -> tuple[float, float]:
    """(peak RSS growth in MB, seconds until Orthanc holds it) for one ``mb`` MB instance."""
    ds = dicom_samples.build_dataset(patient_id="BENCH-BIG", patient_name="Big^Bench", size=(16, 16))
    side = int(((mb << 20) / 2) ** 0.5)
    ds.Rows = ds.Columns = side
    ds.PixelData = bytes(range(256)) * (side * side * 2 // 256) + bytes(side * side * 2 % 256)
    ds.save_as(path, enforce_file_format=True)
    del ds
    before = peak_rss_mb(gateway)
    started = time.perf_counter()
    storescu(gateway.aet, gateway.dicom_port, path, nagle=False)
    seconds = wait_count(orthanc, expected) - started
    path.unlink()
    return peak_rss_mb(gateway) - before, seconds


def report(args: argparse.Namespace, rows: list[tuple[int, str, float, float, float, float]]) -> None:
    print(
        f"\n{args.instances} instances x {args.rounds} rounds, {args.studies} study/ies per batch, "
        f"{args.size}x{args.size} CT, storescu {'with Nagle' if args.nagle else 'TCP_NODELAY=1'}, "
        f"Orthanc {'with Nagle' if args.orthanc_nagle else 'TCP_NODELAY=1'}, {os.cpu_count()} CPUs"
    )
    header = (f"{'round':>5} {'gateway':>9} {'direct/s':>9} {'accept/s':>9} {'ratio':>6} {'end-to-end/s':>13} "
              f"{'ratio':>6} {'CPU ms/inst':>12}")
    print(header)
    print("-" * len(header))
    for r, name, d, a, e, cpu in rows:
        print(f"{r:>5} {name:>9} {d:>9.1f} {a:>9.1f} {a / d:>6.0%} {e:>13.1f} {e / d:>6.0%} {cpu:>12.2f}")
    print("-" * len(header))
    for name in dict.fromkeys(row[1] for row in rows):
        mine = [row for row in rows if row[1] == name]
        ratios_a = statistics.median(a / d for _, _, d, a, _, _ in mine)
        ratios_e = statistics.median(e / d for _, _, d, _, e, _ in mine)
        cpu = statistics.median(row[5] for row in mine)
        print(f"median {name:>9}: accept {ratios_a:.0%} of direct, end-to-end {ratios_e:.0%} of direct, "
              f"CPU {cpu:.2f} ms per instance")


if __name__ == "__main__":
    sys.exit(main())
