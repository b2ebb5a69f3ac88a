#!/bin/sh
# Install everything the test tiers and the demo need on Debian 12, as root.
# Idempotent: apt only runs when something is missing; libreswan is unpacked (never installed,
# its package conflicts with strongSwan's) under tools/.cache/libreswan.
set -eu
TOP=$(cd "$(dirname "$0")/.." && pwd)
PKGS="strongswan-charon strongswan-swanctl strongswan-pki libcharon-extra-plugins
  libstrongswan-extra-plugins libstrongswan-standard-plugins
  knot knot-dnsutils unbound bind9-dnsutils tcpdump iputils-ping iproute2 procps util-linux
  nftables qemu-system-x86 linux-image-amd64 busybox-static gcc libc6-dev linux-libc-dev
  libnss3-tools libnss3 libnspr4 libevent-core-2.1-7 libevent-pthreads-2.1-7 libunbound8 libldns3
  libcap-ng0 libcurl3-nss libldap-2.5-0 libaudit1 libpam0g libselinux1 libsystemd0 libcrypt1
  dns-root-data tshark"
missing=""
for p in $PKGS; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
  echo "install-deps: apt-get install$missing"
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends --no-upgrade $missing
  # Debian starts these in the host namespace; the tests run their own instances.
  for s in strongswan-starter knot unbound; do
    systemctl disable --now "$s" >/dev/null 2>&1 || true
  done
fi
LSW="$TOP/tools/.cache/libreswan"
if [ ! -x "$LSW/usr/libexec/ipsec/pluto" ]; then
  DL=$(mktemp -d)
  (cd "$DL" && apt-get download -q -o APT::Sandbox::User=root libreswan)
  mkdir -p "$LSW"
  dpkg -x "$DL"/libreswan_*.deb "$LSW"
  rm -rf "$DL"
fi
# pluto's libunbound shim for the vm tier's DNS-keyed OE (tests/vm/ubshim.c explains why)
[ "$TOP/tools/.cache/ubshim.so" -nt "$TOP/tests/vm/ubshim.c" ] || gcc -shared -fPIC -O2 -Wall -o "$TOP/tools/.cache/ubshim.so" "$TOP/tests/vm/ubshim.c" -ldl
echo "install-deps: system packages ready; libreswan unpacked in $LSW"
