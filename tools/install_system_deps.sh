#!/usr/bin/env bash
# Debian packages the tests need for real cameras: ffmpeg (HTTP MJPEG camera)
# and GStreamer's RTSP server run by Debian's own python3 (RTSP camera); chromium for the
# live view's browser tests; prometheus (and promtool) to scrape the metrics in the tests;
# docker-compose to validate the deployable stack (`config -q` needs no Docker engine);
# iproute2 and nftables for the tests that run processes as separate hosts (network namespaces).
# Installs only what is missing; needs root or sudo for that.
set -euo pipefail
packages=(ffmpeg python3-gi python3-gst-1.0 gir1.2-gst-rtsp-server-1.0
          gstreamer1.0-plugins-base gstreamer1.0-plugins-good gstreamer1.0-plugins-bad
          chromium prometheus docker-compose iproute2 nftables)
missing=()
for package in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
[ ${#missing[@]} -eq 0 ] && exit 0
echo "installing Debian packages: ${missing[*]}"
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get install -y -q --no-install-recommends "${missing[@]}" \
  || { $sudo apt-get update -q && $sudo apt-get install -y -q --no-install-recommends "${missing[@]}"; }
