#!/usr/bin/env bash
# Sets up a fresh Debian 12 host (as root) for Packetless: system packages, kernel headers for
# bcc, the project's venv (.venv) with bcc exposed, and the Kafka and registry builds from
# Maven Central (cached in ~/.cache/packetless). Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."
say() { printf 'setup: %s\n' "$*" >&2; }

[ "$(id -u)" = 0 ] || { say "run as root (it installs packages and loads eBPF)"; exit 1; }

APT_PACKAGES=(python3-bpfcc bpfcc-tools bpftool linux-headers-amd64 docker.io busybox-static
              iproute2 nftables openjdk-17-jre-headless maven python3-venv tmux git curl)
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  say "installing ${missing[*]}"
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
fi

# bcc compiles against kernel headers; Debian's generic ones serve UAPI-only programs
# (see ../shared/PLATFORM.md) when the running kernel ships none.
mod="/lib/modules/$(uname -r)"
if [ ! -e "$mod/build" ]; then
  hdr=$(ls -d /usr/src/linux-headers-*-amd64 | sort -V | tail -n 1)
  mkdir -p "$mod"
  ln -sfn "$hdr" "$mod/build"
  ln -sfn "${hdr%-amd64}-common" "$mod/source"
  say "linked $mod/build -> $hdr"
fi
if [ ! -d /sys/kernel/tracing/events ]; then
  mount -t tracefs nodev /sys/kernel/tracing || say "could not mount tracefs"
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  say "creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c 'import packetless, faust, confluent_kafka, pytest' 2>/dev/null \
   || [ pyproject.toml -nt .venv/.installed ]; then
  say "installing Python packages"
  .venv/bin/pip install -q -U pip
  .venv/bin/pip install -q -e '.[test]'
  touch .venv/.installed
fi
# Expose only Debian's bcc package to the venv (all of dist-packages would shadow its packages).
site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
mkdir -p .venv/bcc-debian
ln -sfn /usr/lib/python3/dist-packages/bcc .venv/bcc-debian/bcc
echo "$PWD/.venv/bcc-debian" > "$site/bcc-debian.pth"

say "fetching Kafka and building the schema registry (Maven Central, cached)"
.venv/bin/python -m deploy.fetch
say "ready: .venv/bin/packetless doctor"
