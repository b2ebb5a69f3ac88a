"""Key log: Wireshark's `ikev2_decryption_table` and `esp_sa` lines in one file.

    SPIi,SPIr,SK_ei,SK_er,"<IKE encr>",SK_ai,SK_ar,"<IKE integ>"          (hex, no 0x)
    "IPv4","<src>","<dst>","0x<SPI>","<ESP encr>","0x<key>","<ESP integ>","0x<key>"

exactly as Wireshark reads them (Protocols > ISAKMP > IKEv2 Decryption Table, and
Protocols > ESP > ESP SAs); AEAD keys include the 4-byte salt. Lines starting with `#` are
comments. The reader also takes strongSwan's save-keys output (same formats, older ESP names
such as "AES-GCM [RFC4106]"), given the file or the directory holding both tables.
Wireshark has no IKEv2 name for ChaCha20-Poly1305, and one line it cannot read spoils the
rest of its table; such IKE SAs are written as `#ikev2: <line>` with the name
"CHACHA20-POLY1305 [RFC7634]": a comment to Wireshark, a key to `oe-agent decrypt`.
(Wireshark reads ESP "ChaCha20 with Poly1305 [RFC7634]" from version 4.2 on; 4.0 does not.)
"""
from __future__ import annotations

import csv
import io
import ipaddress
import os
from dataclasses import dataclass, field
from pathlib import Path

from oe_agent.ike.const import EncrId, IntegId
from oe_agent.ike.crypto import (ENCR_BY_NAME, ENCRS, INTEG_BY_NAME, INTEGS, Encr, IkeCipher,
                                 IkeKeys, Integ)
from oe_agent.model import ChildSaParams


class KeyLogError(Exception):
    """A key-log line that cannot be read; the message names the line."""


# Wireshark's IKEv2 names -> (ENCR id, key bits); and the integrity names.
_IKE_ENCR_NAMES: dict[str, tuple[int, int]] = {}
for _e in ENCRS.values():
    for _bits in _e.key_bits:
        _IKE_ENCR_NAMES[_e.wireshark_ike(_bits)] = (_e.id, _bits)
_IKE_INTEG_NAMES: dict[str, int] = {i.wireshark_ike: i.id for i in INTEGS.values()}
_IKE_INTEG_NAMES["NONE [RFC4306]"] = IntegId.NONE

NOT_FOR_WIRESHARK = "#ikev2: "
_NO_WIRESHARK_NAME = {ENCRS[EncrId.CHACHA20_POLY1305].wireshark_ike(256)}

# Wireshark's ESP names (both spellings of AES-GCM) -> ENCR id; integrity -> (INTEG id, ICV).
_ESP_ENCR_NAMES: dict[str, int] = {
    "AES-GCM with 16 octet ICV [RFC4106]": EncrId.AES_GCM_16,
    "AES-GCM [RFC4106]": EncrId.AES_GCM_16,
    "AES-CBC [RFC3602]": EncrId.AES_CBC,
    "ChaCha20 with Poly1305 [RFC7634]": EncrId.CHACHA20_POLY1305,
}
_ESP_INTEG_NAMES: dict[str, int] = {i.wireshark_esp: i.id for i in INTEGS.values()}
_ESP_INTEG_NAMES.update({"NULL": IntegId.NONE,
                         "ANY 128 bit authentication [no checking]": IntegId.NONE})


@dataclass(frozen=True)
class IkeKeyLine:
    """One ikev2_decryption_table row: the SK_e/SK_a keys of one IKE SA."""

    spi_i: bytes
    spi_r: bytes
    sk_ei: bytes
    sk_er: bytes
    encr_name: str
    sk_ai: bytes
    sk_ar: bytes
    integ_name: str

    @classmethod
    def of(cls, spi_i: bytes, spi_r: bytes, cipher: IkeCipher, keys: IkeKeys) -> IkeKeyLine:
        encr, integ = cipher.wireshark_ike_names()
        return cls(spi_i, spi_r, keys.sk_ei, keys.sk_er, encr, keys.sk_ai, keys.sk_ar, integ)

    def cipher(self) -> IkeCipher:
        encr_id, bits = _IKE_ENCR_NAMES[self.encr_name]
        return IkeCipher.from_ids(encr_id, bits, _IKE_INTEG_NAMES[self.integ_name])

    def to_line(self) -> str:
        prefix = NOT_FOR_WIRESHARK if self.encr_name in _NO_WIRESHARK_NAME else ""
        return (f'{prefix}{self.spi_i.hex()},{self.spi_r.hex()},'
                f'{self.sk_ei.hex()},{self.sk_er.hex()},'
                f'"{self.encr_name}",{self.sk_ai.hex()},{self.sk_ar.hex()},"{self.integ_name}"')


@dataclass(frozen=True)
class EspKeyLine:
    """One esp_sa row: one direction of a Child SA. src/dst may be "*" (any)."""

    family: str
    src: str
    dst: str
    spi: int
    encr_name: str
    encr_key: bytes
    integ_name: str
    integ_key: bytes

    @property
    def encr(self) -> Encr:
        return ENCRS[_ESP_ENCR_NAMES[self.encr_name]]

    @property
    def integ(self) -> Integ | None:
        iid = _ESP_INTEG_NAMES[self.integ_name]
        return INTEGS[iid] if iid else None

    def matches(self, src, dst) -> bool:
        return self.src in ("*", "", str(src)) and self.dst in ("*", "", str(dst))

    def to_line(self) -> str:
        ik = f"0x{self.integ_key.hex()}" if self.integ_key else ""
        return (f'"{self.family}","{self.src}","{self.dst}","0x{self.spi:08x}",'
                f'"{self.encr_name}","0x{self.encr_key.hex()}","{self.integ_name}","{ik}"')


def esp_lines(params: ChildSaParams) -> tuple[EspKeyLine, EspKeyLine]:
    """The two esp_sa rows of a Child SA: what we send (spi_out) and what we receive (spi_in)."""
    encr = ENCR_BY_NAME[params.alg.encr]
    encr_name = encr.wireshark_esp(params.alg.encr_key_bits)
    integ_name = INTEG_BY_NAME[params.alg.integ].wireshark_esp if params.alg.integ else "NULL"
    fam = "IPv4" if params.local.version == 4 else "IPv6"
    out = EspKeyLine(fam, str(params.local), str(params.remote), params.spi_out, encr_name,
                     params.encr_key_out, integ_name, params.integ_key_out)
    inb = EspKeyLine(fam, str(params.remote), str(params.local), params.spi_in, encr_name,
                     params.encr_key_in, integ_name, params.integ_key_in)
    return out, inb


@dataclass
class KeyTable:
    """Keys read from a key log: IKE SAs by (SPIi, SPIr), ESP SAs by SPI."""

    ike: dict[tuple[bytes, bytes], IkeKeyLine] = field(default_factory=dict)
    esp: dict[int, list[EspKeyLine]] = field(default_factory=dict)

    def esp_for(self, spi: int, src, dst) -> EspKeyLine | None:
        return next((k for k in self.esp.get(spi, ()) if k.matches(src, dst)), None)


def _hex(field_: str, what: str, allow_0x: bool) -> bytes:
    s = field_.strip()
    if allow_0x and s.lower().startswith("0x"):
        s = s[2:]
    try:
        return bytes.fromhex(s)
    except ValueError:
        raise KeyLogError(f"{what} is not hex: {field_!r}") from None


def _ike_line(f: list[str]) -> IkeKeyLine:
    if len(f) != 8:
        raise KeyLogError(f"ikev2_decryption_table line has {len(f)} fields, need 8")
    spi_i, spi_r = _hex(f[0], "SPIi", True), _hex(f[1], "SPIr", True)
    if len(spi_i) != 8 or len(spi_r) != 8:
        raise KeyLogError("IKE SPIs must be 16 hex digits")
    if f[4] not in _IKE_ENCR_NAMES:
        raise KeyLogError(f"unsupported IKE encryption {f[4]!r}")
    if f[7] not in _IKE_INTEG_NAMES:
        raise KeyLogError(f"unsupported IKE integrity {f[7]!r}")
    line = IkeKeyLine(spi_i, spi_r, _hex(f[2], "SK_ei", True), _hex(f[3], "SK_er", True), f[4],
                      _hex(f[5], "SK_ai", True), _hex(f[6], "SK_ar", True), f[7])
    c = line.cipher()
    for name, k, want in (("SK_ei", line.sk_ei, c.encr_key_len),
                          ("SK_er", line.sk_er, c.encr_key_len),
                          ("SK_ai", line.sk_ai, c.integ_key_len),
                          ("SK_ar", line.sk_ar, c.integ_key_len)):
        if len(k) != want:
            raise KeyLogError(f"{name} is {len(k)} bytes; {f[4]} / {f[7]} needs {want}")
    return line


def _esp_line(f: list[str]) -> EspKeyLine:
    if len(f) < 8:
        raise KeyLogError(f"esp_sa line has {len(f)} fields, need 8")
    fam, src, dst = f[0], f[1], f[2]
    if fam not in ("IPv4", "IPv6", "Any IP"):
        raise KeyLogError(f"esp_sa protocol {fam!r}")
    for a in (src, dst):
        if a not in ("*", ""):
            try:
                ipaddress.ip_address(a)
            except ValueError:
                raise KeyLogError(f"esp_sa address {a!r}") from None
    spi_b = _hex(f[3], "SPI", True)
    if len(spi_b) != 4:
        raise KeyLogError(f"esp_sa SPI {f[3]!r}")
    if f[4] not in _ESP_ENCR_NAMES:
        raise KeyLogError(f"unsupported ESP encryption {f[4]!r}")
    if f[6] not in _ESP_INTEG_NAMES:
        raise KeyLogError(f"unsupported ESP integrity {f[6]!r}")
    line = EspKeyLine(fam, src, dst, int.from_bytes(spi_b, "big"), f[4],
                      _hex(f[5], "encryption key", True), f[6], _hex(f[7], "integrity key", True))
    e = line.encr
    bits = (128, 192, 256) if e.id in (EncrId.AES_GCM_16, EncrId.AES_CBC) else e.key_bits
    if len(line.encr_key) not in {e.key_len(b) for b in bits}:
        raise KeyLogError(f"ESP key of {len(line.encr_key)} bytes does not fit {f[4]}")
    if line.integ and len(line.integ_key) != line.integ.key_len:
        raise KeyLogError(f"ESP integrity key of {len(line.integ_key)} bytes does not fit {f[6]}")
    if e.aead and line.integ:
        raise KeyLogError(f"{f[4]} is AEAD; integrity must be NULL")
    if not e.aead and not line.integ:
        raise KeyLogError(f"{f[4]} needs an integrity algorithm")
    return line


def parse_keylog(text: str, table: KeyTable | None = None, source: str = "key log") -> KeyTable:
    """Read key-log text into a table; KeyLogError names the offending line."""
    table = table if table is not None else KeyTable()
    for n, raw in enumerate(text.splitlines(), 1):
        s = raw.strip()
        if s.startswith(NOT_FOR_WIRESHARK):
            s = s[len(NOT_FOR_WIRESHARK):]
        elif not s or s.startswith("#"):
            continue
        try:
            fields = next(csv.reader(io.StringIO(s), skipinitialspace=True))
            if fields[0].startswith(("IPv", "Any")):
                line = _esp_line(fields)
                table.esp.setdefault(line.spi, []).append(line)
            else:
                ike = _ike_line(fields)
                table.ike[(ike.spi_i, ike.spi_r)] = ike
        except KeyLogError as e:
            raise KeyLogError(f"{source} line {n}: {e}") from None
        except csv.Error as e:
            raise KeyLogError(f"{source} line {n}: {e}") from None
    return table


def read_keylog(path: str | os.PathLike) -> KeyTable:
    """A key-log file, or a directory with strongSwan save-keys' `ikev2_decryption_table` and
    `esp_sa` files. OSError / UnicodeDecodeError / KeyLogError propagate for the caller to word."""
    p = Path(path)
    table = KeyTable()
    files = [p / "ikev2_decryption_table", p / "esp_sa"] if p.is_dir() else [p]
    files = [f for f in files if not p.is_dir() or f.exists()]
    if not files:
        raise KeyLogError(f"{p}: directory has neither ikev2_decryption_table nor esp_sa")
    for f in files:
        parse_keylog(f.read_text(encoding="utf-8"), table, str(f))
    return table


class KeyLogWriter:
    """Appends key-log lines to a file created 0600 (keys are secrets). Off unless the agent's
    `keylog` setting names a file (product §7)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self._f = os.fdopen(fd, "a", encoding="utf-8")

    def write_lines(self, lines: list[str], comment: str = "") -> None:
        if comment:
            self._f.write(f"# {comment}\n")
        self._f.write("".join(line + "\n" for line in lines))
        self._f.flush()

    def log_ike_sa(self, spi_i: bytes, spi_r: bytes, cipher: IkeCipher, keys: IkeKeys) -> None:
        self.write_lines([IkeKeyLine.of(spi_i, spi_r, cipher, keys).to_line()],
                         "ikev2_decryption_table")

    def log_child_sa(self, params: ChildSaParams) -> None:
        self.write_lines([line.to_line() for line in esp_lines(params)], "esp_sa")

    def close(self) -> None:
        self._f.close()
