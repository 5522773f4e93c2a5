#!/usr/bin/env bash
# Print a command that runs a Python >= 3.12, or fail with advice.
set -u
ok() { "$@" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' >/dev/null 2>&1; }
if [ -n "${PYTHON:-}" ]; then
    if ok $PYTHON; then echo "$PYTHON"; exit 0; fi
    echo "PYTHON=$PYTHON is not a working Python >= 3.12" >&2; exit 1
fi
for cand in python3.12 python3.13 python3.14 python3 python; do
    if command -v "$cand" >/dev/null 2>&1 && ok "$cand"; then command -v "$cand"; exit 0; fi
done
if command -v pyenv >/dev/null 2>&1; then
    for v in $(pyenv versions --bare 2>/dev/null | grep -E '^3\.(1[2-9])' | sort -V); do
        p="$(pyenv root)/versions/$v/bin/python"
        if ok "$p"; then echo "$p"; exit 0; fi
    done
fi
echo "No Python >= 3.12 found: install one, or run 'make PYTHON=/path/to/python3.12 ...'" >&2
exit 1
