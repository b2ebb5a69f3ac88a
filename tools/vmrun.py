#!/usr/bin/env python3
"""Run one command as root inside Debian's kernel under QEMU: the real-ESP (`vm`) test tier.

This machine's kernel has XFRM but no ESP; linux-image-amd64 has both (as modules). The guest
boots the newest /boot/vmlinuz-* (its uncompressed vmlinux through the PVH entry when it can be
extracted: XZ under TCG costs seconds), a busybox initramfs built here, and this machine's root
filesystem shared read-only over 9p under a tmpfs overlay, so the repo, its venv, tcpdump and
iproute2 are all there. Guest writes vanish at exit, except in --rw directories.

    tools/vmrun.py [options] -- CMD [ARG...]

CMD runs from the repo root (or --cwd) with the venv's python first in PATH, OE_IN_VM=1 and CI,
PYTEST_ADDOPTS and OE_* passed through. Its stdout/stderr stream back live; our exit status is
CMD's. 124 = timeout, 125 = the harness failed. A missing QEMU/kernel/busybox is an error when
CI is set, otherwise a skip (exit 0, with the reason). The wall time goes to stderr at the end.
Pure standard library: it runs before the venv exists, and from any clone path.
"""
from __future__ import annotations

import argparse
import ctypes
import hashlib
import lzma
import os
import re
import selectors
import shlex
import shutil
import signal
import stat
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
GUEST_TMPFS = (Path("/tmp"), Path("/var/tmp"), Path("/run"), Path("/dev/shm"))
CACHE = Path(os.environ.get("VMRUN_CACHE", REPO / "tools" / ".cache" / "vm"))
QEMU = "qemu-system-x86_64"
BUSYBOX = Path("/bin/busybox")
TIMEOUT_RC, HARNESS_RC = 124, 125

# What the initramfs needs to reach the shared root filesystem and talk to the host.
INITRD_MODULES = ("virtio_pci", "virtio_console", "virtio_rng", "9pnet_virtio", "9p", "overlay")
# What the tier needs, loaded in the guest from its own /lib/modules (on the shared root);
# anything else autoloads (the guest has /sbin/modprobe).
GUEST_MODULES = ("xfrm_user", "esp4", "esp6", "ah4", "ah6", "authenc", "seqiv", "echainiv",
                 "gcm", "aesni_intel", "chacha20poly1305", "veth", "bridge")
PASS_ENV = ("CI", "PYTEST_ADDOPTS", "GITHUB_ACTIONS", "TERM", "COLUMNS")


class Missing(Exception):
    """A prerequisite of the vm tier is not installed."""


class HarnessError(Exception):
    """The runner itself failed (not the guest command)."""


def log(msg: str) -> None:
    print(f"vmrun: {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- kernel and modules

def _version_key(name: str) -> list:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def find_kernel(explicit: str | None) -> tuple[Path, str]:
    """The kernel image (default: newest /boot/vmlinuz-*) and its version, with modules present."""
    if explicit:
        kernel = Path(explicit)
        if not kernel.is_file():
            raise Missing(f"kernel {kernel} does not exist")
    else:
        found = sorted(Path("/boot").glob("vmlinuz-*"), key=lambda p: _version_key(p.name))
        if not found:
            raise Missing("no /boot/vmlinuz-* (apt-get install linux-image-amd64)")
        kernel = found[-1]
    version = kernel.name.removeprefix("vmlinuz-")
    if not (Path("/lib/modules") / version / "modules.dep").is_file():
        raise Missing(f"/lib/modules/{version}/modules.dep missing for {kernel}")
    return kernel, version


def pvh_vmlinux(kernel: Path, version: str) -> Path:
    """The uncompressed ELF vmlinux inside a bzImage (QEMU boots it via PVH), cached; else the
    bzImage itself. Debian compresses with XZ: find the stream magic and decode one stream."""
    out = CACHE / f"vmlinux-{version}"
    if out.is_file() and out.stat().st_mtime >= kernel.stat().st_mtime:
        return out
    data = kernel.read_bytes()
    start = data.find(b"\xfd7zXZ\x00")
    if start < 0:
        return kernel
    dec = lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
    try:
        elf = dec.decompress(data[start:])
    except lzma.LZMAError:
        return kernel
    if not elf.startswith(b"\x7fELF"):
        return kernel
    tmp = out.with_name(f"{out.name}.{os.getpid()}")
    tmp.write_bytes(elf)
    tmp.replace(out)
    return out


def module_files(version: str, names: tuple[str, ...]) -> list[Path]:
    """Module files for `names` and their dependencies, dependencies first (from modules.dep);
    built-in ones are skipped."""
    base = Path("/lib/modules") / version
    deps: dict[str, tuple[str, list[str]]] = {}
    for line in (base / "modules.dep").read_text().splitlines():
        path, _, rest = line.partition(":")
        deps[_modname(path)] = (path, [_modname(d) for d in rest.split()])
    builtin = set()
    if (base / "modules.builtin").is_file():
        builtin = {_modname(p) for p in (base / "modules.builtin").read_text().split()}
    order: list[str] = []

    def visit(name: str) -> None:
        name = name.replace("-", "_")
        if name in order or name in builtin:
            return
        if name not in deps:
            raise Missing(f"kernel module {name} not found for {version}")
        for d in deps[name][1]:
            visit(d)
        order.append(name)

    for n in names:
        visit(n)
    return [base / deps[n][0] for n in order]


def _modname(path: str) -> str:
    name = Path(path).name
    for suffix in (".xz", ".zst", ".gz", ".ko"):
        name = name.removesuffix(suffix)
    return name.replace("-", "_")


def _module_bytes(path: Path) -> bytes:
    """busybox insmod wants a plain .ko; Debian may ship .ko.xz."""
    if path.suffix == ".xz":
        return lzma.decompress(path.read_bytes())
    if path.suffix in (".zst", ".gz"):
        raise Missing(f"{path}: compressed modules other than xz are not supported")
    return path.read_bytes()


# ---------------------------------------------------------------- initramfs

INIT = r"""#!/bin/busybox sh
# vmrun initramfs: mount the host's / (9p, read-only) under a tmpfs overlay, then hand over.
/bin/busybox --install -s /bin
export PATH=/bin
die() { echo "vmrun-init: $*"; poweroff -f; }
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
for m in $(cat /modules); do insmod "/modules.d/$m" || echo "vmrun-init: insmod $m failed"; done
mount -t tmpfs -o mode=755 ovl /ovl && mkdir /ovl/lower /ovl/upper /ovl/work || die tmpfs
mount -t 9p -o trans=virtio,version=9p2000.L,ro,cache=loose,msize=512000 hostroot /ovl/lower \
  || die "9p root"
mount -t overlay -o lowerdir=/ovl/lower,upperdir=/ovl/upper,workdir=/ovl/work root /newroot \
  || die overlay
cd /newroot
for d in proc sys dev; do mount --move /$d $d; done
RUN= ; RW=
for a in $(cat proc/cmdline); do
  case $a in vmrun.run=*) RUN=${a#vmrun.run=};; vmrun.rw=*) RW="$RW ${a#vmrun.rw=}";; esac
done
mount -t tmpfs -o mode=755 run run && mkdir -p run/vmrun run/netns run/lock || die "/run"
cp ".$RUN/stage2" ".$RUN/env" ".$RUN/cmd" run/vmrun/ || die "run dir $RUN not readable"
mount -t tmpfs -o mode=1777 tmp tmp; mount -t tmpfs -o mode=1777 vartmp var/tmp
mkdir -p dev/pts dev/shm; mount -t devpts devpts dev/pts; mount -t tmpfs -o mode=1777 shm dev/shm
i=0
for d in $RW; do
  mkdir -p ".$d" && mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 "rw$i" ".$d" \
    || die "rw dir $d"
  i=$((i + 1))
done
n=0
while [ $n -lt 100 ]; do
  for p in sys/class/virtio-ports/*; do
    [ -s "$p/name" ] && ln -sf "/dev/${p##*/}" "run/vmrun/port-$(cat "$p/name")"
  done
  [ -L run/vmrun/port-ctl ] && [ -L run/vmrun/port-out ] && [ -L run/vmrun/port-err ] && break
  usleep 20000; n=$((n + 1))
done
[ -L run/vmrun/port-ctl ] || die "virtio ports did not appear"
exec switch_root /newroot /bin/sh /run/vmrun/stage2
"""

# Runs after switch_root, on the shared root: host tools, the guest kernel's modules.
STAGE2 = r"""#!/bin/sh
P=/run/vmrun
. $P/env
{{
  hostname vmguest
  ip link set lo up
  modprobe -a {modules} || echo "vmrun: some modules did not load (modprobe -a {modules})" >&2
  cd {cwd} || echo "vmrun: cannot cd to {cwd}" >&2
  echo "ready $(cut -d' ' -f1 /proc/uptime)" >$P/port-ctl
  /bin/sh $P/cmd </dev/null
  echo "exit $?" >$P/port-ctl
}} >$P/port-out 2>$P/port-err
exec /bin/busybox poweroff -f
"""


def _newc(entries: list[tuple[str, int, bytes, int]]) -> bytes:
    """A cpio 'newc' archive (the initramfs format): (name, mode, data, rdev) entries."""
    out = bytearray()
    for ino, (name, mode, data, rdev) in enumerate(entries + [("TRAILER!!!", 0, b"", 0)], 1):
        raw = name.encode() + b"\0"
        fields = (ino, mode, 0, 0, 1, 0, len(data), 0, 0, os.major(rdev), os.minor(rdev),
                  len(raw), 0)
        out += b"070701" + b"".join(b"%08X" % f for f in fields) + raw
        out += b"\0" * (-len(out) % 4) + data
        out += b"\0" * (-len(out) % 4)
    return bytes(out)


def _is_static(elf: Path) -> bool:
    """True if the ELF has no PT_INTERP (no dynamic loader): the initramfs has no libc."""
    data = elf.read_bytes()[:65536]
    if data[:4] != b"\x7fELF" or data[4] != 2:
        return False
    phoff, = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    return all(struct.unpack_from("<I", data, phoff + i * phentsize)[0] != 3
               for i in range(phnum))


def initramfs(version: str) -> Path:
    """The busybox initramfs for this kernel, built once per kernel and init script."""
    if not BUSYBOX.is_file() or not _is_static(BUSYBOX):
        raise Missing(f"{BUSYBOX} is not a static busybox (apt-get install busybox-static)")
    mods = module_files(version, INITRD_MODULES)
    key = hashlib.sha256("\n".join([INIT, version, *map(str, mods),
                                    str(BUSYBOX.stat().st_size)]).encode()).hexdigest()[:12]
    out = CACHE / f"initramfs-{version}-{key}.cpio"
    if out.is_file():
        return out
    d, f = stat.S_IFDIR | 0o755, stat.S_IFREG | 0o755
    entries = [(n, d, b"", 0) for n in ("bin", "dev", "proc", "sys", "ovl", "newroot",
                                         "modules.d")]
    entries += [("dev/console", stat.S_IFCHR | 0o600, b"", os.makedev(5, 1)),
                ("bin/busybox", f, BUSYBOX.read_bytes(), 0), ("init", f, INIT.encode(), 0)]
    names = []
    for m in mods:
        name = _modname(str(m)) + ".ko"
        names.append(name)
        entries.append((f"modules.d/{name}", stat.S_IFREG | 0o644, _module_bytes(m), 0))
    entries.append(("modules", stat.S_IFREG | 0o644, " ".join(names).encode() + b"\n", 0))
    tmp = out.with_name(f"{out.name}.{os.getpid()}")
    tmp.write_bytes(_newc(entries))
    tmp.replace(out)
    return out


# ---------------------------------------------------------------- the run

def guest_env(extra: list[str]) -> dict[str, str]:
    """PATH with the venv's python first (a pyenv shim costs seconds in the guest)."""
    bins = []
    venv = Path(sys.prefix) if sys.prefix != sys.base_prefix else REPO / ".venv"
    for b in (venv / "bin", Path(os.path.realpath(sys.executable)).parent):
        if b.is_dir() and str(b) not in bins:
            bins.append(str(b))
    env = {"PATH": ":".join(bins + ["/usr/local/sbin", "/usr/local/bin", "/usr/sbin",
                                    "/usr/bin", "/sbin", "/bin"]),
           "HOME": "/root", "LANG": "C.UTF-8", "OE_IN_VM": "1",
           "PYTHONUNBUFFERED": "1"}
    if venv.is_dir():
        env["VIRTUAL_ENV"] = str(venv)
    for k, v in os.environ.items():
        if k in PASS_ENV or k.startswith("OE_") and k != "OE_IN_VM":
            env[k] = v
    for item in extra:
        k, eq, v = item.partition("=")
        if eq:
            env[k] = v
        elif k in os.environ:
            env[k] = os.environ[k]
    return env


def precompile(dirs: list[Path]) -> None:
    """Byte-compile the repo's python on the host first: compiling is 20-50x slower in the
    guest, and there its __pycache__ writes vanish with the overlay."""
    import compileall
    import io
    from contextlib import redirect_stdout

    for d in dirs:
        if d.is_dir() and os.access(d, os.W_OK):
            with redirect_stdout(io.StringIO()):
                compileall.compile_dir(str(d), quiet=2, workers=0)


def _no_space(p: Path, what: str) -> str:
    s = str(p)
    if re.search(r"\s", s):
        raise HarnessError(f"{what} {s!r} contains whitespace (it goes on the kernel command line)")
    return s


def _die_with_parent() -> None:
    """QEMU must not outlive a SIGKILLed runner (it would run until its own end)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class _Signalled(Exception):
    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _raise_signal(signum, _frame):
    raise _Signalled(signum)


def run(args: argparse.Namespace) -> int:
    if not shutil.which(QEMU):
        raise Missing(f"{QEMU} not found (apt-get install qemu-system-x86)")
    kernel, version = find_kernel(args.kernel)
    CACHE.mkdir(parents=True, exist_ok=True)
    boot = pvh_vmlinux(kernel, version)
    initrd = initramfs(version)
    rw = [Path(d).resolve() for d in args.rw]
    for d in rw:
        d.mkdir(parents=True, exist_ok=True)
    cwd = Path(args.cwd).resolve() if args.cwd else REPO
    # The guest mounts fresh tmpfs on these; a clone under one (CI may clone into /tmp) would
    # vanish there, so such a repo or working directory is shared at the same path instead.
    for d in (REPO, cwd):
        if any(d.is_relative_to(t) for t in GUEST_TMPFS) and not any(
                d.is_relative_to(r) for r in rw):
            rw.append(d)
    if not args.no_precompile:
        precompile([REPO / d for d in ("oe_agent", "tests", "bench")])

    rundir = Path(tempfile.mkdtemp(prefix="vmrun."))
    rundir.chmod(0o755)
    try:
        env = guest_env(args.env)
        (rundir / "env").write_text("".join(f"export {k}={shlex.quote(v)}\n"
                                            for k, v in env.items()))
        (rundir / "cmd").write_text(shlex.join(args.command) + "\n")
        (rundir / "stage2").write_text(STAGE2.format(
            modules=" ".join(args.modules.split(",")) if args.modules else "",
            cwd=shlex.quote(str(cwd))))
        append = ["console=ttyS0", "quiet", "loglevel=3",
                  # The crypto self-tests cost ~6 s under TCG at module load (aesni alone);
                  # the tier proves ESP end to end. `--append cryptomgr.notests=0` restores them.
                  "cryptomgr.notests=1", *args.append.split(), "panic=-1",
                  f"vmrun.run={_no_space(rundir, 'run dir')}"]
        append += [f"vmrun.rw={_no_space(d, 'rw dir')}" for d in rw]
        fifos = {}
        for name in ("out", "err", "ctl"):
            os.mkfifo(rundir / name)
            # O_RDWR: opening never blocks and QEMU's open never blocks either.
            fifos[name] = os.open(rundir / name, os.O_RDWR | os.O_NONBLOCK)
        cmd = [QEMU, "-accel", args.accel, "-cpu", args.cpu, "-machine", "q35",
               "-smp", str(args.cpus), "-m", args.mem, "-nodefaults", "-no-user-config",
               "-display", "none", "-no-reboot", "-serial", f"file:{rundir}/console.log",
               "-kernel", str(boot), "-initrd", str(initrd), "-append", " ".join(append),
               "-fsdev", "local,id=root,path=/,security_model=none,readonly=on,multidevs=remap",
               "-device", "virtio-9p-pci,fsdev=root,mount_tag=hostroot",
               "-device", "virtio-rng-pci", "-device", "virtio-serial-pci"]
        for i, d in enumerate(rw):
            cmd += ["-fsdev", f"local,id=rw{i},path={d},security_model=none",
                    "-device", f"virtio-9p-pci,fsdev=rw{i},mount_tag=rw{i}"]
        for name in fifos:
            cmd += ["-chardev", f"file,id={name},path={rundir / name}",
                    "-device", f"virtserialport,chardev={name},name={name}"]
        if args.verbose:
            log(f"kernel {boot} ({version}), initramfs {initrd}")
            log(shlex.join(cmd))
        return _supervise(cmd, fifos, rundir, args)
    finally:
        if args.keep:
            log(f"kept {rundir}")
        else:
            shutil.rmtree(rundir, ignore_errors=True)


def _supervise(cmd: list[str], fifos: dict[str, int], rundir: Path,
               args: argparse.Namespace) -> int:
    """Start QEMU in its own process group, stream the guest's output, enforce the timeout."""
    t0 = time.monotonic()
    sinks = {fifos["out"]: sys.stdout.buffer, fifos["err"]: sys.stderr.buffer}
    ctl = b""
    sel = selectors.DefaultSelector()
    for fd in fifos.values():
        sel.register(fd, selectors.EVENT_READ)
    old = {s: signal.signal(s, _raise_signal) for s in (signal.SIGTERM, signal.SIGHUP)}
    qemu = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, start_new_session=True,
                            preexec_fn=_die_with_parent)
    timed_out = False

    def pump() -> None:
        nonlocal ctl
        for key, _ in sel.select(timeout=0.2):
            chunk = _read(key.fd)
            if key.fd == fifos["ctl"]:
                ctl += chunk
            elif chunk:
                sinks[key.fd].write(chunk)
                sinks[key.fd].flush()

    try:
        while qemu.poll() is None:
            pump()
            if time.monotonic() - t0 > args.timeout:
                timed_out = True
                break
        # drain what QEMU wrote before it exited
        for fd in fifos.values():
            while chunk := _read(fd):
                if fd == fifos["ctl"]:
                    ctl += chunk
                else:
                    sinks[fd].write(chunk)
                    sinks[fd].flush()
    except (KeyboardInterrupt, _Signalled) as e:
        signum = e.signum if isinstance(e, _Signalled) else signal.SIGINT
        _kill(qemu)
        log(f"interrupted by signal {signum}; QEMU killed")
        return 128 + signum
    finally:
        _kill(qemu)
        for s, h in old.items():
            signal.signal(s, h)
        for fd in fifos.values():
            os.close(fd)
    wall = time.monotonic() - t0
    ready = re.search(rb"^ready ([\d.]+)", ctl, re.M)
    status = re.search(rb"^exit (\d+)", ctl, re.M)
    boot = f", guest up after {float(ready.group(1)):.1f} s of guest time" if ready else ""
    if timed_out:
        log(f"TIMEOUT after {args.timeout} s{boot}; QEMU killed. Last console lines:")
        _console_tail(rundir)
        return TIMEOUT_RC
    if status is None:
        log(f"no exit status from the guest (QEMU rc={qemu.returncode}){boot}; "
            "last console lines:")
        _console_tail(rundir)
        return HARNESS_RC
    rc = int(status.group(1))
    log(f"guest command exited {rc}; wall time {wall:.1f} s{boot}")
    return rc


def _read(fd: int) -> bytes:
    try:
        return os.read(fd, 65536)
    except BlockingIOError:
        return b""


def _kill(p: subprocess.Popen) -> None:
    if p.poll() is None:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    p.wait()


def _console_tail(rundir: Path, n: int = 30) -> None:
    try:
        lines = (rundir / "console.log").read_text(errors="replace").splitlines()
    except OSError:
        lines = []
    if not lines:
        lines = ["(console empty: the kernel runs with `quiet`; try --append loglevel=7)"]
    for line in lines[-n:]:
        print(f"  | {line}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="vmrun.py", usage="%(prog)s [options] -- CMD [ARG...]",
        description="Run CMD as root in Debian's kernel under QEMU (real ESP); see the module "
                    "docstring. Exit: CMD's status, 124 timeout, 125 harness failure.")
    p.add_argument("--timeout", type=float, default=float(os.environ.get("VMRUN_TIMEOUT", 900)),
                   help="seconds for the whole run, boot included (default 900, $VMRUN_TIMEOUT)")
    p.add_argument("--mem", default=os.environ.get("VMRUN_MEM", "2G"))
    p.add_argument("--cpus", type=int, default=int(os.environ.get("VMRUN_CPUS", 2)))
    p.add_argument("--accel", default="tcg",
                   help="tcg (default: /dev/kvm here is a nested device a stock guest crawls on)")
    p.add_argument("--cpu", default=os.environ.get("VMRUN_CPU", "max"),
                   help="QEMU CPU model (default max: the AES-NI flag is needed for aesni_intel)")
    p.add_argument("--kernel", default=os.environ.get("VMRUN_KERNEL"),
                   help="bzImage (default: newest /boot/vmlinuz-*)")
    p.add_argument("--rw", action="append", default=[], metavar="DIR",
                   help="host dir shared read-write at the same path (repeatable)")
    p.add_argument("--env", action="append", default=[], metavar="NAME[=VALUE]",
                   help="pass an environment variable into the guest (repeatable)")
    p.add_argument("--cwd", help="directory to run CMD in (default: the repo root)")
    p.add_argument("--modules", default=",".join(GUEST_MODULES),
                   help="comma-separated modules to modprobe in the guest")
    p.add_argument("--append", default="", help="extra kernel command line arguments")
    p.add_argument("--no-precompile", action="store_true",
                   help="skip byte-compiling the repo's python on the host before the boot")
    p.add_argument("--keep", action="store_true", help="keep the run dir (console.log)")
    p.add_argument("-v", "--verbose", action="store_true")
    p.add_argument("command", nargs=argparse.REMAINDER)
    args = p.parse_args(argv)
    if args.command[:1] == ["--"]:
        args.command = args.command[1:]
    if not args.command:
        p.error("no command given (put it after --)")
    try:
        return run(args)
    except Missing as e:
        if os.environ.get("CI"):
            log(f"FAILED: {e}. CI is set: the vm tier must run, not skip.")
            return HARNESS_RC
        log(f"SKIPPED (not in CI): {e}")
        return 0
    except (HarnessError, OSError) as e:
        log(f"FAILED: {e}")
        return HARNESS_RC


if __name__ == "__main__":
    sys.exit(main())
