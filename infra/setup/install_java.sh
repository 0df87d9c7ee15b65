#!/usr/bin/env bash
# Spark needs Java 17. Install the headless JRE from Debian when no `java` is on PATH.
set -euo pipefail
if command -v java >/dev/null 2>&1; then exit 0; fi
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
echo "setup: installing Java 17 (openjdk-17-jre-headless) from apt"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq openjdk-17-jre-headless >/dev/null
java -version
