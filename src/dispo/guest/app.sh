#!/bin/sh
# dispo-app: run the session's app as the unprivileged user, on the display dispo asked for.
#   dispo-app web WxH -- CMD [ARG...]   a private X display (TigerVNC's Xvnc on :1) that listens on the
#                                       guest's loopback only; dispo reaches it through the session's SSH
#                                       (a forward to a unix socket in the host's session state dir)
#   dispo-app x11 -- CMD [ARG...]       CMD on the display that `ssh -X` forwarded from the host
# It exits with CMD's status, and the display goes with it: closing the browser ends the session.
set -u
mode=${1:-}; shift || true

case "$mode" in
web)
    geometry=${1:-1280x800}; shift
    [ "${1:-}" = "--" ] && shift
    # -localhost: nothing but the guest itself (and so the SSH forward) reaches the VNC port.
    Xvnc :1 -localhost -rfbport 5900 -SecurityTypes None -geometry "$geometry" -depth 24 -AlwaysShared \
        -nolisten tcp > /tmp/dispo-xvnc.log 2>&1 &
    xvnc=$!
    wm=
    trap 'kill $xvnc $wm 2>/dev/null' EXIT
    trap 'exit 129' HUP INT TERM
    i=0
    while [ ! -e /tmp/.X11-unix/X1 ] && [ $i -lt 200 ]; do sleep 0.05; i=$((i + 1)); done
    export DISPLAY=:1
    # A window manager that keeps the one app window full-screen, following the viewer's size.
    if command -v matchbox-window-manager > /dev/null; then
        matchbox-window-manager -use_titlebar no -use_cursor no > /dev/null 2>&1 &
        wm=$!
    fi
    echo "dispo-app: display ready" >&2
    "$@"
    status=$?
    exit $status
    ;;
x11)
    [ "${1:-}" = "--" ] && shift
    exec "$@"
    ;;
*)
    echo "usage: dispo-app web WxH -- CMD... | dispo-app x11 -- CMD..." >&2
    exit 2
    ;;
esac
