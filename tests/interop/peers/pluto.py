"""libreswan's pluto as an interop peer inside a test host.

libreswan is only unpacked (tools/install-deps.sh: its package conflicts with strongSwan's),
and pluto 4.10 exec()s the hard-coded /usr/libexec/ipsec/addconn at start-up. So pluto runs in
a private mount namespace where a read-only overlay adds /usr/libexec/ipsec, and its run dir is
bind-mounted on /run (short control-socket path: pytest's tmp dirs are long). Its NSS db, ipsec.d
and secrets are its own. On this kernel (no ESP) pluto's Child SA install fails with ENOSYS:
as initiator it then deletes the IKE SA without notification and re-initiates (stop it with
`delete`); as responder it answers TS_UNACCEPTABLE and keeps the IKE SA (interop README,
pitfalls 10 and 11).
"""
from __future__ import annotations

import re
import shutil
import subprocess
import time
from pathlib import Path

from tests.hosts import Host

ROOT = Path(__file__).resolve().parents[3]
LIBRESWAN = ROOT / "tools" / ".cache" / "libreswan" / "usr" / "libexec" / "ipsec"

SETUP = """\
config setup
    logfile={log}
    logappend=no
    dumpdir=/run
    plutodebug={debug}
{dnssec}    ikev1-policy=drop
    protostack=xfrm
{listen}
conn %default
    # 4.10 rejects keyexchange=ikev2 ("invalid value")
    ikev2=insist
    leftupdown=%disabled
    rightupdown=%disabled

"""


def new_nss_db(nss: Path, rsa_bits: int = 3072) -> None:
    """An NSS db ("ipsec initnss") holding one fresh RSA host key (rsasigkey, >= 2192 bits)."""
    nss.mkdir(parents=True, exist_ok=True)
    subprocess.run(["certutil", "-N", "-d", f"sql:{nss}", "--empty-password"],
                   check=True, capture_output=True, timeout=30)
    subprocess.run([str(LIBRESWAN / "rsasigkey"), "--nssdir", str(nss), str(rsa_bits)],
                   check=True, capture_output=True, timeout=120)


class Pluto:
    """One pluto in `host`, with an RSA host key in its own NSS db."""

    def __init__(self, host: Host, *, name: str = "pluto", rsa_bits: int = 3072,
                 debug: str = "none", nss_template: Path | None = None,
                 dns: tuple[str, Path] | None = None, preload: Path | None = None,
                 listen: str | None = None):
        self.host = host
        self.name = name
        self.dir = host.workdir / name
        self.rundir = self.dir / "run"
        self.nss = self.dir / "nss"
        self.conf = self.dir / "ipsec.conf"
        self.log = self.dir / "pluto.log"
        self.rsa_bits = rsa_bits
        self.nss_template = nss_template  # an NSS db made by make_key() before, copied
        self.debug = debug
        # dns = (nameserver, DS anchors file): %dnsondemand keys, DNSSEC-validated by pluto's
        # libunbound, which reads a resolv.conf bind-mounted on /etc/resolv.conf
        self.dns = dns
        self.preload = preload  # LD_PRELOAD for pluto (e.g. the vm tier's libunbound shim)
        self.listen = host.v4 if listen is None else listen  # "": every address (v4 and v6)
        self.conns: dict[str, str] = {}
        self.proc: subprocess.Popen | None = None
        self.ckaid = ""
        self.rsasigkey = ""  # RFC 3110 base64 of our public key (without the "0s")
        self.public_pem = b""

    # --- keys (libreswan's own tools, so the private key lives in NSS as pluto expects) ---
    def _tool(self, tool: str, *args: str, **kw) -> str:
        return subprocess.run([str(LIBRESWAN / tool), *args], check=True, capture_output=True,
                              text=True, timeout=60, **kw).stdout

    def make_key(self) -> None:
        """An NSS db with one RSA host key (rsasigkey: at least 2192 bits in 4.10), or a copy
        of `nss_template` (RSA generation is the slow part of starting pluto)."""
        if self.nss_template is not None:
            shutil.copytree(self.nss_template, self.nss, dirs_exist_ok=True)
        else:
            new_nss_db(self.nss, self.rsa_bits)
        listing = self._tool("showhostkey", "--nssdir", str(self.nss), "--list")
        m = re.search(r"ckaid: ([0-9a-f]+)", listing)
        if not m:
            raise RuntimeError(f"showhostkey found no key: {listing!r}")
        self.ckaid = m.group(1)
        left = self._tool("showhostkey", "--nssdir", str(self.nss), "--left", "--ckaid", self.ckaid)
        m = re.search(r"leftrsasigkey=0s(\S+)", left)
        if not m:
            raise RuntimeError(f"showhostkey --left gave no rsasigkey: {left!r}")
        self.rsasigkey = m.group(1)
        self.public_pem = self._tool("showhostkey", "--nssdir", str(self.nss), "--pem",
                                     "--ckaid", self.ckaid).encode()

    # --- lifecycle ---
    def add_conn(self, name: str, body: str) -> None:
        """A conn section (indented key=value lines). Loaded at start, or now if running."""
        self.conns[name] = body
        self._write_conf()
        if self.proc is not None:
            self.addconn(name)

    def _write_conf(self) -> None:
        dnssec = "    dnssec-enable=no\n"
        if self.dns is not None:
            dnssec = ("    dnssec-enable=yes\n    dnssec-rootkey-file=\"\"\n"
                      f"    dnssec-anchors={self.dns[1]}\n")
        listen = f"    listen={self.listen}\n" if self.listen else ""
        text = SETUP.format(log=self.log, debug=self.debug, listen=listen, dnssec=dnssec)
        for name, body in self.conns.items():
            text += f"conn {name}\n{body.rstrip()}\n\n"
        self.conf.write_text(text)

    def start(self, timeout: float = 10.0) -> "Pluto":
        if not self.ckaid:
            self.make_key()
        for d in (self.rundir, self.dir / "ipsec.d", self.dir / "libexec-add"):
            d.mkdir(parents=True, exist_ok=True)
        link = self.dir / "libexec-add" / "ipsec"
        link.unlink(missing_ok=True)
        link.symlink_to(LIBRESWAN)
        (self.dir / "ipsec.secrets").touch()
        self._write_conf()
        for stale in ("pluto.ctl", "pluto.pid"):
            (self.rundir / stale).unlink(missing_ok=True)
        resolv = env = ""
        if self.dns is not None:
            (self.dir / "resolv.conf").write_text(f"nameserver {self.dns[0]}\n")
            resolv = f"mount --bind '{self.dir}/resolv.conf' /etc/resolv.conf && "
        if self.preload is not None:
            env = f"env LD_PRELOAD='{self.preload}' "
        self.proc = self.host.popen(
            "unshare", "--mount", "--propagation", "private", "sh", "-c",
            f"mount -t overlay overlay -o 'lowerdir={self.dir}/libexec-add:/usr/libexec' "
            f"/usr/libexec && mount --bind '{self.rundir}' /run && {resolv}"
            f"exec {env}'{LIBRESWAN}/pluto' --config '{self.conf}' --rundir /run "
            f"--nssdir '{self.nss}' --ipsecdir '{self.dir}/ipsec.d' "
            f"--secretsfile '{self.dir}/ipsec.secrets' --nofork",
            log=f"{self.name}.stdout", cwd=self.dir)
        # up = whack gets an answer (the socket file exists a moment before pluto listens)
        deadline = time.monotonic() + timeout
        while not ((self.rundir / "pluto.ctl").is_socket()
                   and self.whack("--status", check=False, timeout=5).returncode == 0):
            if self.proc.poll() is not None:
                raise RuntimeError(f"pluto exited ({self.proc.returncode}): {self.tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"pluto's control socket did not answer: {self.tail()}")
            time.sleep(0.05)
        for name in self.conns:
            self.addconn(name)
        return self

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.whack("--shutdown", check=False, timeout=10)
            deadline = time.monotonic() + 5
            while self.proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
        self.host.stop(self.proc)  # SIGTERM by PID if it is still there
        self.proc = None

    def tail(self, lines: int = 30) -> str:
        out = []
        for f in (self.host.workdir / f"{self.name}.stdout", self.log):
            if f.exists():
                out += f.read_text(errors="replace").splitlines()[-lines:]
        return "\n".join(out)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    # --- control (whack/addconn talk to run/pluto.ctl; relative path keeps sun_path short) ---
    def whack(self, *args: str, check: bool = True, timeout: float = 20) -> subprocess.CompletedProcess:
        return subprocess.run([str(LIBRESWAN / "whack"), "--ctlsocket", "pluto.ctl", *args],
                              cwd=self.rundir, capture_output=True, text=True, timeout=timeout,
                              check=check)

    def addconn(self, name: str) -> None:
        r = subprocess.run([str(LIBRESWAN / "addconn"), "--ctlsocket", "pluto.ctl",
                            "--config", str(self.conf), name],
                           cwd=self.rundir, capture_output=True, text=True, timeout=20)
        if r.returncode != 0:
            raise RuntimeError(f"addconn {name}: {r.stdout}{r.stderr}")

    def initiate(self, name: str, timeout: float = 20) -> str:
        """whack --initiate: waits for the outcome and returns pluto's progress lines."""
        r = self.whack("--initiate", "--name", name, check=False, timeout=timeout)
        return r.stdout + r.stderr

    def delete(self, name: str) -> None:
        self.whack("--delete", "--name", name, check=False)

    def states(self) -> str:
        return self.whack("--showstates", check=False).stdout

    def wait_log(self, pattern: str, timeout: float = 15.0) -> re.Match:
        deadline = time.monotonic() + timeout
        rx = re.compile(pattern)
        while True:
            m = rx.search(self.log_text())
            if m:
                return m
            if time.monotonic() > deadline:
                raise TimeoutError(f"pluto log never matched {pattern!r}:\n{self.tail()}")
            time.sleep(0.1)


def rsa_conn(*, left: str, right: str, left_rsasigkey: str, right_rsasigkey: str,
             ike: str = "aes128-sha2_256-modp2048", esp: str = "aes_gcm128",
             extra: str = "") -> str:
    """A host-to-host tunnel conn with raw RSA keys (RFC 3110 base64, no "0s")."""
    return (f"    left={left}\n    leftid={left}\n    leftrsasigkey=0s{left_rsasigkey}\n"
            f"    right={right}\n    rightid={right}\n    rightrsasigkey=0s{right_rsasigkey}\n"
            f"    authby=rsasig\n    type=tunnel\n    ike={ike}\n    esp={esp}\n"
            f"    auto=add\n{extra}")
