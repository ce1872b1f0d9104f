#!/usr/bin/env bash
# Debian packages the service and its tests use: libopus0 (Opus decode at 24 kHz),
# janus (the SFU in end-to-end tests and the demo), espeak-ng (speech for tests and the demo),
# nats-server (JetStream, for the cluster tests).
# Installs only what is missing; says loudly when it cannot.
set -u
want=(libopus0 janus espeak-ng nats-server)
missing=()
for pkg in "${want[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if ! command -v apt-get >/dev/null 2>&1; then
  echo "WARNING: no apt-get here; missing Debian packages: ${missing[*]} (tests that need them will be skipped)" >&2
  exit 0
fi
sudo=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then sudo="sudo -n"; else
    echo "WARNING: not root and no sudo; missing Debian packages: ${missing[*]} (tests that need them will be skipped)" >&2
    exit 0
  fi
fi
echo "installing Debian packages: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq >/dev/null 2>&1 || true
if ! $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/tmp/live-transcription-apt.log 2>&1; then
  echo "WARNING: apt-get install ${missing[*]} failed (see /tmp/live-transcription-apt.log); tests that need them will be skipped" >&2
fi
# The Debian packages start janus and nats-server as system services; the tests and the demo run their own.
if command -v systemctl >/dev/null 2>&1; then
  $sudo systemctl disable --now janus >/dev/null 2>&1 || true
  $sudo systemctl disable --now nats-server >/dev/null 2>&1 || true
fi
exit 0
