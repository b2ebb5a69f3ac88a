"""CLI verbs for keys in DNS: newhostkey, showhostkey, publish, lookup, serve-zones.

The verbs follow libreswan's names (`ipsec newhostkey`, `ipsec showhostkey --ipseckey`).
"""
from __future__ import annotations

import asyncio
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

from oe_agent.dns import ipseckey
from oe_agent.errors import UserError

KEY_TYPES = ("ed25519", "rsa")


# --- key files ------------------------------------------------------------------------------

def generate_key(kind: str = "ed25519", bits: int | None = None):
    if kind == "ed25519":
        if bits is not None:
            raise UserError("--bits applies to --type rsa only")
        return ed25519.Ed25519PrivateKey.generate()
    if kind == "rsa":
        bits = 3072 if bits is None else bits
        if not 2048 <= bits <= 4096:
            raise UserError(f"--bits {bits}: RSA keys must be 2048-4096 bits")
        return rsa.generate_private_key(65537, bits)
    raise UserError(f"--type {kind}: want one of {', '.join(KEY_TYPES)}")


def write_private_key(path: str | Path, key) -> None:
    """PKCS#8 PEM, mode 0600, created exclusively: an existing key is never overwritten."""
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise UserError(f"{path} exists; not overwriting a host key") from None
    except OSError as exc:
        raise UserError(f"{path}: {exc.strerror}") from None
    with os.fdopen(fd, "wb") as f:
        f.write(pem)


def load_private_key(path: str | Path):
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise UserError(f"{path}: {exc.strerror}") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise UserError(f"{path}: not an unencrypted PEM private key ({exc})") from None
    if not isinstance(key, (ed25519.Ed25519PrivateKey, ed448.Ed448PrivateKey,
                            rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey)):
        raise UserError(f"{path}: {type(key).__name__} has no IPSECKEY algorithm")
    return key


def _key_words(key) -> str:
    if isinstance(key, rsa.RSAPrivateKey):
        return f"RSA-{key.key_size}"
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return f"ECDSA {key.curve.name}"
    return "Ed25519" if isinstance(key, ed25519.Ed25519PrivateKey) else "Ed448"


def ipseckey_lines(key, owners: list[str], precedence: int = 10, ttl: int | None = None,
                   gateway: str | None = None) -> list[str]:
    """Zone-file lines: absolute owner name, TTL, IN IPSECKEY rdata (RFC 4025 §3.1)."""
    try:
        rdata = ipseckey.rdata_text(precedence, key.public_key(), gateway)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    lines = [f"; oe-agent host key, {_key_words(key)}"]
    for o in owners:
        try:
            owner = ipseckey.owner_name(o).to_text()
        except ValueError as exc:
            raise UserError(str(exc)) from None
        lines.append(f"{owner} {'' if ttl is None else str(ttl) + ' '}IN IPSECKEY {rdata}")
    return lines


# --- verbs ----------------------------------------------------------------------------------

def cmd_newhostkey(args) -> int:
    key = generate_key(args.type, args.bits)
    write_private_key(args.output, key)
    print(f"wrote {args.output} ({_key_words(key)}, PKCS#8 PEM, mode 0600)")
    return 0


def cmd_showhostkey(args) -> int:
    key = load_private_key(args.key)
    if args.pubkey:
        sys.stdout.write(key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode())
        return 0
    if not args.ipseckey:
        raise UserError("say what to show: --ipseckey or --pubkey")
    owners = (args.address or []) + (args.fqdn or [])
    if not owners:
        raise UserError("--ipseckey needs the owner: --address ADDR or --fqdn NAME")
    print("\n".join(ipseckey_lines(key, owners, args.precedence, args.ttl, args.gateway)))
    return 0


def _tsig(args):
    from oe_agent.dns.publish import TsigKey
    try:
        if args.tsig_file:
            return TsigKey.from_file(args.tsig_file)
        if args.tsig:
            return TsigKey.from_text(args.tsig)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    raise UserError("publish needs a TSIG key: --tsig-file FILE or --tsig [ALG:]NAME:SECRET")


def cmd_publish(args) -> int:
    from oe_agent.dns.publish import PublishError, Publisher
    owner_text = args.address or args.fqdn
    if not owner_text:
        raise UserError("publish needs the owner: --address ADDR or --fqdn NAME")
    try:
        owner = ipseckey.owner_name(owner_text)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    key = load_private_key(args.key)
    new = ipseckey.rdata_text(args.precedence, key.public_key(), args.gateway)
    try:
        pub = Publisher(args.server, owner, _tsig(args), zone=args.zone, ttl=args.ttl,
                        timeout=args.timeout)
    except ValueError as exc:
        raise UserError(f"--server: {exc}") from None

    async def switch():
        if args.switch_command:
            r = await asyncio.to_thread(subprocess.run, shlex.split(args.switch_command))
            if r.returncode:
                raise UserError(f"--switch-command exited with {r.returncode}; old key kept")

    try:
        if args.rollover:
            if not args.old_key:
                raise UserError("--rollover needs --old-key FILE (the key in use now)")
            old = ipseckey.rdata_text(args.precedence, load_private_key(args.old_key).public_key(),
                                      args.gateway)
            asyncio.run(pub.rollover(old, new, on_switch=switch, report=print))
        else:
            asyncio.run(pub.replace(new))
            print(f"published {owner} IPSECKEY {new.split()[2]} (ttl {args.ttl})")
    except PublishError as exc:
        raise UserError(str(exc)) from None
    return 0


def _resolver_from_args(args):
    from oe_agent.dns.resolver import KeyResolver
    resolvers, anchors, mode, timeout = args.resolver, args.anchors, args.dnssec, args.timeout
    if args.config:
        from oe_agent import config
        try:
            cfg = config.load(args.config)
        except (ValueError, OSError) as exc:
            raise UserError(str(exc)) from None
        resolvers = resolvers or [str(a) for a in cfg.resolvers]
        anchors = anchors or (str(cfg.trust_anchors) if cfg.trust_anchors else None)
        mode = mode or cfg.dnssec
        timeout = timeout or cfg.dns_timeout
    if not resolvers:
        resolvers = _resolv_conf()
    try:
        return KeyResolver(resolvers, anchors, mode or "validate", timeout=timeout or 5.0)
    except ValueError as exc:
        raise UserError(str(exc)) from None


def _resolv_conf() -> list[str]:
    try:
        lines = Path("/etc/resolv.conf").read_text().splitlines()
    except OSError:
        lines = []
    found = [ln.split()[1] for ln in lines if ln.startswith("nameserver") and len(ln.split()) > 1]
    if not found:
        raise UserError("no resolver: give --resolver ADDR or -c CONFIG")
    return found


def cmd_lookup(args) -> int:
    resolver = _resolver_from_args(args)

    async def run():
        return await asyncio.gather(*(resolver.lookup(n) for n in args.names))

    try:
        answers = asyncio.run(run())
    except ValueError as exc:
        raise UserError(str(exc)) from None
    if args.json:
        out = [a.to_json() for a in answers]
        print(json.dumps(out[0] if len(out) == 1 else out, indent=2))
    else:
        print("\n".join(a.describe() for a in answers))
    return 1 if any(a.status in ("bogus", "timeout") for a in answers) else 0


def cmd_serve_zones(args) -> int:
    from oe_agent.dns import server
    try:
        asyncio.run(server.serve(args.zones, args.listen or ["127.0.0.1"], args.port,
                                 args.anchors_out))
    except (ValueError, OSError) as exc:
        raise UserError(f"serve-zones: {exc}") from None
    return 0


def register(sub) -> None:
    p = sub.add_parser("newhostkey", help="make a host key (Ed25519 by default)")
    p.add_argument("--output", required=True, metavar="FILE")
    p.add_argument("--type", choices=KEY_TYPES, default="ed25519")
    p.add_argument("--bits", type=int, help="RSA size, 2048-4096 (default 3072)")
    p.set_defaults(func=cmd_newhostkey)

    p = sub.add_parser("showhostkey", help="print the host key as IPSECKEY zone lines or PEM")
    p.add_argument("--key", required=True, metavar="FILE")
    p.add_argument("--ipseckey", action="store_true", help="zone-file IPSECKEY lines")
    p.add_argument("--pubkey", action="store_true", help="the public key alone (PEM)")
    p.add_argument("--address", action="append", metavar="ADDR", help="owner = reverse name")
    p.add_argument("--fqdn", action="append", metavar="NAME", help="owner = this name")
    p.add_argument("--precedence", type=int, default=10)
    p.add_argument("--gateway", help="security gateway (address or name) instead of the host")
    p.add_argument("--ttl", type=int)
    p.set_defaults(func=cmd_showhostkey)

    p = sub.add_parser("publish", help="put the host's IPSECKEY in DNS (RFC 2136 + TSIG)")
    p.add_argument("--key", required=True, metavar="FILE", help="the host key (new key)")
    p.add_argument("--server", required=True, help="primary server, ADDR or ADDR@PORT")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--address", metavar="ADDR")
    g.add_argument("--fqdn", metavar="NAME")
    p.add_argument("--zone", help="zone to update (default: found by a SOA query)")
    p.add_argument("--tsig-file", metavar="FILE", help="BIND/knot key file or NAME:SECRET")
    p.add_argument("--tsig", metavar="[ALG:]NAME:SECRET")
    p.add_argument("--ttl", type=int, default=300)
    p.add_argument("--precedence", type=int, default=10)
    p.add_argument("--gateway")
    p.add_argument("--timeout", type=float, default=5.0)
    p.add_argument("--rollover", action="store_true",
                   help="add the new key, wait the TTL, switch, remove --old-key's record")
    p.add_argument("--old-key", metavar="FILE")
    p.add_argument("--switch-command", help="run at the switch (e.g. 'oe-agent reload')")
    p.set_defaults(func=cmd_publish)

    p = sub.add_parser("lookup", help="keys of a peer and their DNSSEC status")
    p.add_argument("names", nargs="+", metavar="NAME|ADDR")
    p.add_argument("--json", action="store_true")
    p.add_argument("-c", "--config", metavar="FILE", help="take [dns] from this config")
    p.add_argument("--resolver", action="append", metavar="ADDR[@PORT]")
    p.add_argument("--anchors", metavar="FILE", help="trust anchors (DS/DNSKEY lines)")
    p.add_argument("--dnssec", choices=("validate", "resolver", "off"))
    p.add_argument("--timeout", type=float)
    p.set_defaults(func=cmd_lookup)

    p = sub.add_parser("serve-zones", help="embedded authoritative server for a zones dir")
    from oe_agent.dns.server import register_args
    register_args(p)
    p.set_defaults(func=cmd_serve_zones)
