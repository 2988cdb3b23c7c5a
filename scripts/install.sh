#!/usr/bin/env bash
# Installs memd as a host service, or removes it again (run as root; `make install`, `make uninstall`).
#   scripts/install.sh               install or upgrade in place
#   scripts/install.sh --uninstall   remove exactly what install added (not /var/lib/memd: agent state)
#
# What goes where (each overridable from the environment or the make command line):
#   VENV=/opt/memd                   a virtualenv of its own, holding a copy of this tree (not an
#                                    editable install: cleaning or deleting the checkout later
#                                    leaves the service intact), with the libvirt extra
#   BINDIR=/usr/local/bin            symlinks memd, memd-guest -> $VENV/bin
#   UNITDIR=/etc/systemd/system      memd.service: docs/memd.service with these paths filled in
#   DOCDIR=/usr/share/doc/memd       README.md, docs/*.md (the unit's Documentation=), the Grafana
#                                    dashboard and alert rules of docs/operators.md §8
#   PYTHON=/usr/bin/python3          the interpreter the venv is made from
#   EXTRAS=libvirt                   pip extras ('' for none)
# DESTDIR-style staging is not offered: a venv records its own absolute path, so it only works
# where it was created.  To install elsewhere (tests/install does), point all four paths there.
# $VENV/install-manifest.txt lists every path outside the venv that install created; uninstall
# removes those and the venv.  systemctl daemon-reload runs only when systemd is the init system
# and UNITDIR is /etc/systemd/system.
set -euo pipefail
src=$(cd "$(dirname "$0")/.." && pwd)

VENV=${VENV:-/opt/memd}
BINDIR=${BINDIR:-/usr/local/bin}
UNITDIR=${UNITDIR:-/etc/systemd/system}
DOCDIR=${DOCDIR:-/usr/share/doc/memd}
PYTHON=${PYTHON:-/usr/bin/python3}
EXTRAS=${EXTRAS-libvirt}
COMMANDS=(memd memd-guest)
SYSTEM_UNITDIR=/etc/systemd/system
MARK="# Installed by memd's scripts/install.sh"

die() { echo "install: $*" >&2; exit 1; }

for var in VENV BINDIR UNITDIR DOCDIR; do
    path=${!var}
    # The paths go into the unit unquoted (ExecStart=, Documentation=) and into sed.
    [[ "$path" == /* && "$path" =~ ^[A-Za-z0-9._/+-]+$ && "$path" != */ ]] \
        || die "$var must be an absolute path of letters, digits and ._+-/ without a trailing /: '$path'"
done
manifest=$VENV/install-manifest.txt

# systemd as PID 1 (sd_booted()'s test), and the unit in the directory it reads.
systemd_manages_unit() {
    [[ -d /run/systemd/system && "$UNITDIR" == "$SYSTEM_UNITDIR" ]] && command -v systemctl >/dev/null
}

# Removes the paths read from stdin (one a line): files, and symlinks only while they still point
# into the venv (something else may have replaced them since).
remove_paths() {
    local path
    while IFS= read -r path; do
        if [[ -L "$path" ]]; then
            if [[ "$(readlink "$path")" == "$VENV"/* ]]; then rm -f "$path"; fi
        elif [[ -f "$path" ]]; then
            rm -f "$path"
        fi
    done
}

uninstall() {
    if [[ ! -f "$manifest" || ! -f "$VENV/pyvenv.cfg" ]]; then
        echo "install: no memd installed in $VENV (no $manifest)"
        return 0
    fi
    if systemd_manages_unit && [[ -f "$UNITDIR/memd.service" ]]; then
        systemctl disable --now memd.service || true
    fi
    remove_paths < "$manifest"
    rmdir "$DOCDIR" 2>/dev/null || true
    rm -rf "$VENV"
    if systemd_manages_unit; then systemctl daemon-reload; fi
    echo "install: removed memd from $VENV, $BINDIR, $UNITDIR and $DOCDIR"
}

if [[ "${1:-}" == "--uninstall" ]]; then
    uninstall
    exit 0
fi
[[ $# -eq 0 ]] || die "usage: $0 [--uninstall]"

# --- the interpreter -----------------------------------------------------------------------------
py=$(command -v "$PYTHON") || die "no interpreter $PYTHON (set PYTHON=/path/to/python3.11+)"
py_real=$(readlink -f "$py")
# The venv's bin/python is a symlink to this interpreter, and the unit hides /home, /root (ProtectHome=)
# and /tmp (PrivateTmp=): a pyenv or home-directory Python would leave the service without one.
case "$py_real" in
    /home/* | /root/* | /run/user/* | /tmp/* | /var/tmp/*)
        die "$PYTHON is $py_real, which memd.service cannot see (ProtectHome=/PrivateTmp=); use a system interpreter such as PYTHON=/usr/bin/python3" ;;
esac
"$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || die "$PYTHON is older than 3.11"
if ! "$py" -c 'import ensurepip, venv' 2>/dev/null; then
    # Debian splits venv/ensurepip out of python3.
    command -v apt-get >/dev/null && [[ $(id -u) -eq 0 ]] \
        || die "$PYTHON cannot create virtualenvs (Debian: apt-get install python3-venv)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-venv
fi

# --- the venv --------------------------------------------------------------------------------------
if [[ -e "$VENV" && ! -f "$VENV/pyvenv.cfg" && -n "$(ls -A "$VENV")" ]]; then
    die "$VENV exists and is not a virtualenv; refusing to install over it"
fi
# Upgrade in place when the venv runs on the same interpreter (a running service keeps its files
# until restarted); otherwise start it afresh.
base=$("$VENV/bin/python" -c 'import os, sys; print(os.path.realpath(sys._base_executable))' \
       2>/dev/null || true)
[[ "$base" == "$py_real" ]] || "$py" -m venv --clear "$VENV"
# Build from a copy of the tree: setuptools writes build/ and *.egg-info next to the sources, and a
# stale build/lib from an older checkout would end up in the wheel.
stage=$(mktemp -d "${TMPDIR:-/tmp}/memd-install.XXXXXX")
trap 'rm -rf "$stage"' EXIT
tar -C "$src" --exclude=./.git --exclude=./.venv --exclude=./build --exclude='*.egg-info' \
    --exclude=__pycache__ --exclude=.mypy_cache --exclude=.ruff_cache --exclude=.pytest_cache -cf - . \
    | tar -C "$stage" -xf -
spec=$stage
[[ -n "$EXTRAS" ]] && spec="$stage[$EXTRAS]"
# pip always reinstalls a project given as a directory, so this also upgrades memd in place.
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-warn-script-location "$spec"
"$VENV/bin/memd" --version >/dev/null || die "$VENV/bin/memd does not run"

# --- commands, unit, documentation -----------------------------------------------------------------
installed=()
mkdir -p "$BINDIR" "$UNITDIR" "$DOCDIR"
for cmd in "${COMMANDS[@]}"; do
    link=$BINDIR/$cmd
    if [[ -e "$link" || -L "$link" ]] && [[ "$(readlink "$link" || true)" != "$VENV/bin/$cmd" ]]; then
        echo "install: replacing $link ($(readlink "$link" || echo 'a regular file'))" >&2
    fi
    ln -sfn "$VENV/bin/$cmd" "$link"
    installed+=("$link")
done

unit=$UNITDIR/memd.service
{
    echo "$MARK from $src"
    sed -e "s|/opt/memd/|$VENV/|g" -e "s|/usr/share/doc/memd/|$DOCDIR/|g" "$src/docs/memd.service"
} > "$unit.tmp"
chmod 0644 "$unit.tmp"
mv -f "$unit.tmp" "$unit"
installed+=("$unit")

for doc in "$src/README.md" "$src"/docs/*.md "$src/docs/grafana-memd.json" "$src/docs/memd-alerts.yml"; do
    install -m 0644 "$doc" "$DOCDIR/"
    installed+=("$DOCDIR/$(basename "$doc")")
done
# An upgrade drops what the previous install put down and this one did not (a removed doc page).
if [[ -f "$manifest" ]]; then
    grep -vxF -f <(printf '%s\n' "${installed[@]}") "$manifest" | remove_paths || true
fi
printf '%s\n' "${installed[@]}" > "$manifest"

if systemd_manages_unit; then
    systemctl daemon-reload
    if systemctl is-active --quiet memd.service; then
        echo "install: memd.service still runs the previous version: systemctl restart memd"
    else
        echo "install: start it with: systemctl enable --now memd"
    fi
else
    echo "install: $unit written (systemd is not managing $UNITDIR here: no daemon-reload)"
fi
echo "install: $("$VENV/bin/memd" --version) in $VENV; ${COMMANDS[*]} in $BINDIR"
