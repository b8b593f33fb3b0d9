#!/usr/bin/env bash
# Installs the Debian packages speechbrain-meta needs (as root), or names them (otherwise).
# espeak-ng and sox synthesise the embedded corpus; apt's package lists let the recipes
# fetch Debian text and speech packages with `apt-get download` (no game is installed).
# cmake and g++ build the kenlm Python package (the `lm` extra: CTC beam search with an n-gram).
set -euo pipefail
missing=()
for tool in espeak-ng sox cmake g++; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
lists_empty() { ! compgen -G "/var/lib/apt/lists/*_Packages" >/dev/null; }
if [ "$(id -u)" = 0 ]; then
    if [ ${#missing[@]} -gt 0 ] || lists_empty; then
        apt-get update -qq
    fi
    if [ ${#missing[@]} -gt 0 ]; then
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
elif [ ${#missing[@]} -gt 0 ]; then
    echo "speechbrain-meta needs the Debian packages: ${missing[*]} (run: sudo apt-get install ${missing[*]})" >&2
    exit 1
fi
