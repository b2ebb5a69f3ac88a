#!/usr/bin/env python3
"""Benchmark (not a test): IKE SA + Child SA handshakes per second against ONE responder,
oe-agent's IKE engine vs strongSwan's charon, Ed25519 and RSA-2048, plus the crypto-only limit.

    sudo .venv/bin/python bench/handshake_rate.py [--quick] [-n 300] [--window 8] [--rounds 3]

Setup (two namespaces on the lab bridge, same run, A/B order alternating every round):
- responder in h2: either oe-agent's engine (oe_agent.ike.adapter.IkeAdapter, one static peer
  key, no COOKIE threshold) or charon (kernel-libipsec, `dos_protection = no`, pitfall 4);
  both tunnel mode (libipsec has no transport mode), the same key pair, the same proposals:
  IKE aes256gcm16-prfsha256-x25519, ESP aes128gcm16.
- load initiator in h1: one charon for every run (C, multi-threaded, so the responder and not
  the initiator is the bottleneck; our Python engine as initiator would cap both sides near its
  own speed and hide the difference). It keeps W initiations in flight over VICI until N Child
  SAs are up, and deletes each IKE SA once its Child SA is up, so state stays bounded
  (`reuse_ikesa = no`, pitfall 5). A round's rate = N / (first initiate -> N-th child up).
- crypto-only limit, in this process, same run: the responder's crypto for one handshake
  (X25519 keygen + shared secret, SKEYSEED + prf+ keys, one signature, one verification,
  Child SA KEYMAT) in a loop, with oe-agent's own crypto functions, timed in CPU time; limit =
  1 / cost (one core, like the single-threaded oe-agent responder). The responders' own CPU
  time per handshake (/proc) is reported too: on a shared machine it is the steadier figure.

Fairness notes: both charons log nothing (level -1; oe-agent logs nothing); charon installs each
Child SA into libipsec, the oe-agent responder hands it to no dataplane (it only emits the
event), which favours oe-agent slightly. Prints min/median/max per side and the medians' ratio
oe-agent / charon; writes JSON into bench/results/.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (ROOT, BenchError, cpu_seconds, lab, need_charon,  # noqa: E402
                    need_root, positive, run_main, summary, table, write_json)

IKE_PROPOSAL = "aes256gcm16-prfsha256-x25519"
ESP_PROPOSAL = "aes128gcm16"
AUTHS = ("ed25519", "rsa")
MAX_N = 5000  # above this one run alone may not fit the 15-minute budget at RSA rates
MAX_WINDOW = 64


# --- the oe-agent responder (runs inside h2 as `handshake_rate.py --serve CONFIG`) ---------

def serve(path: str) -> int:
    """One static peer on the engine's asyncio adapter; no output per SA (charon logs nothing
    either); prints 'ready' once bound, counts on SIGTERM."""
    import ipaddress
    import signal

    from cryptography.hazmat.primitives import serialization

    from oe_agent.ike import auth as ikeauth
    from oe_agent.ike.adapter import IkeAdapter
    from oe_agent.ike.events import ChildSaEstablished, NegotiationFailed
    from oe_agent.ike.payloads import IdInitiator
    from oe_agent.ike.sa import IkeConfig
    from oe_agent.model import Mode

    raw = json.loads(Path(path).read_text())
    key = serialization.load_pem_private_key(raw["key_pem"].encode(), None)
    peer_key = serialization.load_pem_public_key(raw["peer_pem"].encode())
    local, remote = ipaddress.ip_address(raw["local"]), ipaddress.ip_address(raw["remote"])
    cfg = IkeConfig(local_id=IdInitiator.from_address(str(local)),
                    credential=ikeauth.SignatureCredential(key, rsa_padding="pkcs1"),
                    peer_keys=(peer_key,), ike_proposals=(IKE_PROPOSAL,),
                    esp_proposals=(ESP_PROPOSAL,), mode=Mode.TUNNEL, liveness_interval=0)
    counts = {"child_sas": 0, "failed": 0}

    def on_event(sa, ev) -> None:
        if isinstance(ev, ChildSaEstablished):
            counts["child_sas"] += 1
        elif isinstance(ev, NegotiationFailed):
            counts["failed"] += 1

    async def run() -> None:
        adapter = IkeAdapter([local], lambda l, r: cfg if r == remote else None, on_event,
                             cookie_threshold=None)
        await adapter.start()
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        print("ready", flush=True)
        await stop.wait()
        adapter.close()
        print(json.dumps(counts), flush=True)

    if raw.get("profile"):  # --profile: where the responder's CPU goes (cProfile)
        import cProfile
        prof = cProfile.Profile()
        prof.runcall(asyncio.run, run())
        prof.dump_stats(raw["profile"])
    else:
        asyncio.run(run())
    return 0


# --- the crypto-only limit ------------------------------------------------------------------

def crypto_limit(kind: str, key, peer_key, seconds: float) -> dict:
    """Handshakes per second one core could do if the responder did nothing but its crypto."""
    from oe_agent.ike import auth as ikeauth
    from oe_agent.ike.const import DhId, EncrId, HashAlgorithm, PrfId
    from oe_agent.ike.crypto import (IkeCipher, child_keys, derive_ike_keys, key_exchange,
                                     prf_for, skeyseed)

    rng = os.urandom
    prf = prf_for(PrfId.HMAC_SHA2_256)
    cipher = IkeCipher.from_ids(EncrId.AES_GCM_16, 256)
    hashes = [HashAlgorithm.SHA2_256, HashAlgorithm.SHA2_384, HashAlgorithm.SHA2_512]
    peer_kx = key_exchange(DhId.CURVE25519, rng)
    ni, nr, spi_i, spi_r = rng(32), rng(32), rng(8), rng(8)
    octets_i, octets_r = rng(400), rng(400)  # sizes of real signed octets (§2.15)
    sk_pi = rng(32)
    # the initiator's AUTH, made once: verifying it costs the same every time
    peer_method, peer_auth = ikeauth.sign(ikeauth.SignatureCredential(peer_key[0]), octets_i,
                                          prf, sk_pi, [HashAlgorithm.SHA2_256])
    cred = ikeauth.SignatureCredential(key, rsa_padding="pkcs1")

    def once() -> None:
        kx = key_exchange(DhId.CURVE25519, rng)
        g_ir = kx.shared(peer_kx.public)
        keys = derive_ike_keys(prf, cipher, skeyseed(prf, ni, nr, g_ir), ni, nr, spi_i, spi_r)
        ikeauth.verify(peer_method, peer_auth, octets_i, prf, sk_pi, keys=[peer_key[1]])
        ikeauth.sign(cred, octets_r, prf, keys.sk_pr, hashes)
        child_keys(prf, keys.sk_d, ni, nr, 20, 0)

    once()
    # CPU time, not wall time: on a shared machine the wall clock also counts other people's
    # work, and the limit is a property of this code on one core
    n, t0 = 0, time.process_time()
    while (dt := time.process_time() - t0) < seconds:
        for _ in range(10):
            once()
        n += 10
    return {"auth": kind, "handshakes": n, "seconds": dt, "per_handshake_ms": dt / n * 1000,
            "limit_per_s": n / dt}


# --- the benchmark --------------------------------------------------------------------------

def quiet_charon_class():
    from tests.interop.peers.charon import Charon

    class QuietCharon(Charon):
        """charon with every log group at -1 (silent): oe-agent's responder logs nothing."""

        def write_config(self) -> None:
            super().write_config()
            text = re.sub(r"(?m)^(\s+(?:default|ike|chd|knl|esp|cfg|net|enc) = )\d+",
                          r"\g<1>-1", self.conf.read_text())
            self.conf.write_text(text.replace("flush_line = yes", "flush_line = no"))
    return QuietCharon


def system_seconds(pid: int) -> float | None:
    """stime of a process: kernel work it pays for (its sendto runs the veth/bridge path
    into the peer's namespace), part of cpu_seconds."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[12]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def drive(ctl, ev, conn: str, n: int, window: int, done: set, stall: float = 15.0) -> dict:
    """Keep `window` initiations in flight until n Child SAs are up; delete each IKE SA once its
    Child SA is up. Returns wall time and counts; raises BenchError if the run stalls."""
    from tests.interop.peers.vici import EVENT
    import socket as _socket

    up = started = failed = 0  # `done`: IKE SAs already counted (also by earlier calls)
    ev.sock.settimeout(stall)
    t0 = time.perf_counter()
    while up < n:
        while started - up - failed < window and started < n + failed:
            ctl.request("initiate", {"child": "host", "ike": conn, "timeout": -1,
                                     "init-limits": "no"})
            started += 1
        try:
            ptype, name, body = ev._recv()
        except _socket.timeout:
            raise BenchError(f"stalled: {up}/{n} Child SAs up, {failed} failed, nothing "
                             f"for {stall:.0f} s") from None
        if ptype != EVENT:
            continue
        sa = body.get(conn)
        if not isinstance(sa, dict):
            continue
        uid = sa.get("uniqueid")
        if name == "child-updown" and body.get("up") == "yes" and uid not in done:
            up += 1
            done.add(uid)
            ctl.request("terminate", {"ike-id": uid, "timeout": -1})
        elif name == "ike-updown" and body.get("up") != "yes" and uid not in done:
            failed += 1
            done.add(uid)
            if failed > max(10, n // 10):
                raise BenchError(f"too many failed handshakes ({failed}); see the logs")
    wall = time.perf_counter() - t0
    return {"up": up, "failed": failed, "seconds": wall, "rate": up / wall}


def settle(initiator, conn: str, timeout: float = 15.0) -> None:
    """Wait (bounded) until the initiator holds no IKE SA of `conn` any more."""
    deadline = time.monotonic() + timeout
    while initiator.list_sas(conn):
        if time.monotonic() > deadline:
            initiator.terminate(ike=conn, force=True, timeout_ms=-1)
            return
        time.sleep(0.1)


def run_side(side, h1, h2, initiator, keys, auth, args, tag, QuietCharon) -> dict:
    from tests.interop.peers.charon import host_conn
    from tests.interop.peers.vici import Vici

    ka, kb = keys[auth]
    conn = f"ini-{auth}"
    resp_proc = charon = None
    try:
        if side == "charon":
            charon = QuietCharon(h2, name=f"resp-{tag}")
            charon.start()
            charon.load_key(kb)
            charon.load_conn("resp", host_conn(local=h2.v4, remote=h1.v4, local_key=kb,
                                               remote_pub=ka.public_pem, child="host",
                                               proposals=IKE_PROPOSAL,
                                               esp_proposals=ESP_PROPOSAL))
        else:
            cfg = h2.workdir / f"resp-{tag}.json"
            prof = None
            if args.profile:
                (ROOT / "bench" / "results").mkdir(exist_ok=True)
                prof = str(ROOT / "bench" / "results" / f"handshake_rate-profile-{tag}.pstats")
            cfg.write_text(json.dumps({"local": h2.v4, "remote": h1.v4,
                                       "key_pem": kb.private_pem.decode(),
                                       "peer_pem": ka.public_pem.decode(), "profile": prof}))
            log = f"resp-{tag}.log"
            resp_proc = h2.popen(sys.executable, str(Path(__file__).resolve()), "--serve",
                                 str(cfg), log=log, cwd=str(ROOT))
            deadline = time.monotonic() + 20
            while b"ready" not in (h2.workdir / log).read_bytes():
                if resp_proc.poll() is not None or time.monotonic() > deadline:
                    raise BenchError("oe-agent responder did not start: "
                                     + (h2.workdir / log).read_text()[-2000:])
                time.sleep(0.05)
        ctl, ev = Vici(initiator.socket), Vici(initiator.socket)
        try:
            ev.register("child-updown")
            ev.register("ike-updown")
            done: set[str] = set()
            drive(ctl, ev, conn, args.warmup, min(args.window, args.warmup), done)  # untimed
            settle(initiator, conn)
            pid = charon.proc.pid if charon is not None else resp_proc.pid
            cpu0, sys0 = cpu_seconds(pid), system_seconds(pid)
            result = drive(ctl, ev, conn, args.n, args.window, done)
            cpu1, sys1 = cpu_seconds(pid), system_seconds(pid)
            settle(initiator, conn)
            # the responder's CPU per handshake: robust to how busy the shared machine is
            result["responder_cpu_ms"] = (None if cpu0 is None or cpu1 is None
                                          else (cpu1 - cpu0) * 1000 / max(1, result["up"]))
            result["responder_sys_ms"] = (None if sys0 is None or sys1 is None
                                          else (sys1 - sys0) * 1000 / max(1, result["up"]))
        finally:
            ctl.close()
            ev.close()
        return result
    finally:
        if charon is not None:
            charon.stop()
        if resp_proc is not None:
            h2.stop(resp_proc)


def body(args) -> int:
    if args.n > MAX_N:
        raise BenchError(f"-n {args.n} is too large: at most {MAX_N} per run fits the "
                         "15-minute budget")
    if args.window > MAX_WINDOW or args.window > args.n:
        raise BenchError(f"--window {args.window} must be at most {MAX_WINDOW} and at most -n")
    need_root()
    need_charon()
    from tests.interop.peers import keys as keygen
    from tests.interop.peers.charon import host_conn

    QuietCharon = quiet_charon_class()
    keys = {a: (keygen.generate(a), keygen.generate(a)) for a in args.auth}
    runs: dict = {a: {"oe-agent": [], "charon": [], "crypto": []} for a in args.auth}
    with lab("handshake") as hosts:
        h1, h2 = hosts.pair()
        initiator = QuietCharon(h1, name="initiator")
        initiator.start()
        for auth in args.auth:
            ka, kb = keys[auth]
            initiator.load_key(ka)
            initiator.load_conn(f"ini-{auth}", host_conn(
                local=h1.v4, remote=h2.v4, local_key=ka, remote_pub=kb.public_pem,
                child="host", proposals=IKE_PROPOSAL, esp_proposals=ESP_PROPOSAL))
        for r in range(args.rounds):
            for auth in args.auth:
                ka, kb = keys[auth]
                c = crypto_limit(auth, kb.private, (ka.private, ka.public), args.crypto_seconds)
                runs[auth]["crypto"].append(c)
                print(f"round {r} {auth:7s} crypto-only   {c['limit_per_s']:8.1f} /s "
                      f"({c['per_handshake_ms']:.2f} ms per handshake)", flush=True)
                order = ("oe-agent", "charon") if r % 2 == 0 else ("charon", "oe-agent")
                for side in order:
                    m = run_side(side, h1, h2, initiator, keys, auth, args,
                                 f"{side}-{auth}-{r}", QuietCharon)
                    runs[auth][side].append(m)
                    print(f"round {r} {auth:7s} {side:13s} {m['rate']:8.1f} /s "
                          f"({m['up']} up in {m['seconds']:.2f} s, {m['failed']} failed; "
                          f"responder CPU {m['responder_cpu_ms']:.2f} ms per handshake, "
                          f"{m['responder_sys_ms']:.2f} of it in the kernel)",
                          flush=True)
        initiator.stop()

    report: dict = {"benchmark": "handshake_rate", "n": args.n, "window": args.window,
                    "rounds": args.rounds, "ike_proposal": IKE_PROPOSAL,
                    "esp_proposal": ESP_PROPOSAL, "mode": "tunnel",
                    "initiator": "charon (kernel-libipsec) in a second namespace, VICI-driven",
                    "results": {}}
    rows = []
    for auth in args.auth:
        oe = summary([m["rate"] for m in runs[auth]["oe-agent"]])
        ch = summary([m["rate"] for m in runs[auth]["charon"]])
        cr = summary([c["limit_per_s"] for c in runs[auth]["crypto"]])
        ratio = oe["median"] / ch["median"]
        of_limit = oe["median"] / cr["median"]
        oe_cpu = summary([m["responder_cpu_ms"] for m in runs[auth]["oe-agent"]
                          if m["responder_cpu_ms"] is not None])
        ch_cpu = summary([m["responder_cpu_ms"] for m in runs[auth]["charon"]
                          if m["responder_cpu_ms"] is not None])
        crypto_ms = summary([c["per_handshake_ms"] for c in runs[auth]["crypto"]])
        report["results"][auth] = {"oe-agent": oe, "charon": ch, "crypto_only_limit": cr,
                                   "ratio_oe_over_charon": ratio,
                                   "oe_fraction_of_crypto_limit": of_limit,
                                   "crypto_share_of_oe_responder_cpu": (
                                       crypto_ms["median"] / oe_cpu["median"]
                                       if oe_cpu["median"] else None),
                                   "responder_cpu_ms_per_handshake": {"oe-agent": oe_cpu,
                                                                      "charon": ch_cpu,
                                                                      "crypto-only": crypto_ms},
                                   "raw": runs[auth]}
        label = "RSA-2048" if auth == "rsa" else "Ed25519"
        for side, s, c in (("oe-agent", oe, oe_cpu), ("charon", ch, ch_cpu),
                           ("crypto-only limit", cr, crypto_ms)):
            rows.append([label, side, s["min"], s["median"], s["max"],
                         f"{ratio:.2f}x" if side == "oe-agent" else "",
                         f"{of_limit:.0%}" if side == "oe-agent" else "", c["median"]])
    print()
    print(f"IKE SA + Child SA per second, one responder, N={args.n}, window={args.window}, "
          f"{args.rounds} round(s)")
    print(table(["auth", "responder", "min /s", "median /s", "max /s", "oe/charon",
                 "% of crypto limit", "CPU ms/handshake"], rows))
    cpu_ratios = {a: report["results"][a]["responder_cpu_ms_per_handshake"] for a in args.auth}
    for a, c in cpu_ratios.items():
        if c["oe-agent"]["median"] and c["charon"]["median"]:
            print(f"{a}: responder CPU per handshake, oe-agent/charon = "
                  f"{c['oe-agent']['median'] / c['charon']['median']:.2f}x "
                  "(charon's threads summed; a load-independent view of the ratio); crypto is "
                  f"{c['crypto-only']['median'] / c['oe-agent']['median']:.0%} of the oe-agent "
                  "responder's CPU per handshake")
    out = write_json("handshake_rate", report)
    print(f"wrote {out.relative_to(ROOT)}")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="one round of 60 handshakes")
    ap.add_argument("-n", type=positive, default=None, help="handshakes per run (default 300)")
    ap.add_argument("--window", type=positive, default=8, help="initiations in flight")
    ap.add_argument("--rounds", type=positive, default=None, help="A/B rounds (default 3)")
    ap.add_argument("--auth", choices=AUTHS, action="append",
                    help="ed25519 and/or rsa (default both)")
    ap.add_argument("--profile", action="store_true",
                    help="run the oe-agent responder under cProfile (slower; its rate and CPU "
                         "are then not comparable); stats in bench/results/*.pstats")
    ap.add_argument("--serve", metavar="CONFIG", help=argparse.SUPPRESS)
    try:
        args = ap.parse_args()
    except SystemExit as e:
        return int(e.code or 0)
    if args.serve:
        return serve(args.serve)
    args.n = args.n or (60 if args.quick else 300)
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.auth = tuple(dict.fromkeys(args.auth or AUTHS))
    args.warmup = 4
    args.crypto_seconds = 1.0 if args.quick else 2.0
    return run_main("handshake_rate", lambda: body(args))


if __name__ == "__main__":
    sys.exit(main())
