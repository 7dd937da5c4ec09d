# Shared by the scripts: sourced, not run.
# shellcheck shell=bash

die() { printf '%s: %s\n' "$(basename "$0")" "$*" >&2; exit 1; }

as_root_apt_install() { # packages...
    if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
        apt-get update -q
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@"
    else
        die "missing system packages; as root run: apt-get install -y $*"
    fi
}
