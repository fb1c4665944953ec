#!/usr/bin/env bash
# Secret scan: runs detect-secrets over every tracked or untracked-not-ignored file and fails on
# any finding that .secrets.baseline does not already list (`make lint` and CI run it).
#
# A false positive: mark it in the source with a `# pragma: allowlist secret` comment, or
# regenerate and audit the baseline (see the end of this file).
set -euo pipefail

ROOT="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

HOOK=.venv/bin/detect-secrets-hook
BASELINE=.secrets.baseline

[[ -x $HOOK ]] || { echo "secret-scan: $HOOK not found: run 'make setup'" >&2; exit 2; }
[[ -f $BASELINE ]] || { echo "secret-scan: $BASELINE is missing" >&2; exit 2; }

# Tracked and untracked-but-not-ignored files that exist, minus the baseline itself and
# Cargo.lock (its checksums are high-entropy hex by design).
files=()
while IFS= read -r -d '' file; do
    case $file in
        "$BASELINE" | Cargo.lock | */Cargo.lock) continue ;;
    esac
    [[ -f $file && ! -L $file ]] && files+=("$file")
done < <(git ls-files -z -co --exclude-standard)

if ((${#files[@]} == 0)); then
    echo "secret-scan: no files to scan"
    exit 0
fi

# One invocation over the whole list, so the hook sees every file when it checks the baseline.
rc=0
"$HOOK" --baseline "$BASELINE" "${files[@]}" || rc=$?
case $rc in
    0) echo "secret-scan: ${#files[@]} files, no new secrets" ;;
    3)
        # No new secret; the hook only refreshed line numbers of known entries.
        echo "secret-scan: ${#files[@]} files, no new secrets ($BASELINE line numbers refreshed: commit it)"
        ;;
    *)
        cat >&2 <<'EOF'

secret-scan: FAILED: detect-secrets found possible secrets that are not in .secrets.baseline
(listed above with file and line). Remove them: real secrets belong in Vault or in your local,
git-ignored .env. For a false positive, add `# pragma: allowlist secret` (or the `//` form)
on that line, or regenerate the baseline with its stored filters and audit it:
    git ls-files -z -co --exclude-standard | grep -zv -e '^.secrets.baseline$' -e 'Cargo.lock$' |
        xargs -0 .venv/bin/detect-secrets scan --baseline .secrets.baseline
    .venv/bin/detect-secrets audit .secrets.baseline
EOF
        exit 1
        ;;
esac
