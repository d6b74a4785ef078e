#!/bin/sh
# dispo-app: run the session's app as the unprivileged user, on the display dispo asked for.
#   dispo-app web WxH -- CMD [ARG...]   a private X display (TigerVNC's Xvnc on :1) that listens on the
#                                       guest's loopback only; dispo reaches it through the session's SSH
#                                       (a forward to a unix socket in the host's session state dir)
#   dispo-app x11 -- CMD [ARG...]       CMD on the display that `ssh -X` forwarded from the host
#   dispo-app attach -- CMD [ARG...]    for a clone restored from a template, whose app already runs on :1 (a
#                                       browser on a blank page): hand CMD (the browser with the session's URL)
#                                       to the running browser, then stay until that app exits
#   dispo-app settle SECONDS            wait until the guest's CPUs are idle (the app finished starting), at
#                                       most SECONDS: a template is saved once its app is ready
# It exits with CMD's status, and the display goes with it: closing the browser ends the session.
set -u
mode=${1:-}; shift || true
# The session's environment (written at boot by browser-setup: the language, the quiet browser's switches).
if [ -r /run/dispo/session.env ]; then
    set -a
    . /run/dispo/session.env
    set +a
fi

# The value of kernel argument $1 (dispo.clip=... -> ...), empty if absent: the session's policies.
arg() {
    for w in $(cat /proc/cmdline); do
        case "$w" in "$1="*) echo "${w#*=}"; return 0 ;; esac
    done
    return 0
}

case "$mode" in
web)
    geometry=${1:-1280x800}; shift
    [ "${1:-}" = "--" ] && shift
    # The clipboard policy (profile [clipboard]): "in" the viewer may set the guest's clipboard, "out" the
    # guest's reaches the viewer; Xvnc enforces it and caps the text (dispo.clipmax bytes).
    clip=$(arg dispo.clip)
    [ -n "$clip" ] || clip=in,out
    clipmax=$(arg dispo.clipmax)
    case "$clipmax" in ''|*[!0-9]*) clipmax=1048576 ;; esac
    accept=0 send=0
    case ",$clip," in *,in,*) accept=1 ;; esac
    case ",$clip," in *,out,*) send=1 ;; esac
    # -localhost: nothing but the guest itself (and so the SSH forward) reaches the VNC port.
    Xvnc :1 -localhost -rfbport 5900 -SecurityTypes None -geometry "$geometry" -depth 24 -AlwaysShared \
        -AcceptCutText="$accept" -SendCutText="$send" -SetPrimary="$accept" -SendPrimary=0 \
        -MaxCutText="$clipmax" -nolisten tcp > /tmp/dispo-xvnc.log 2>&1 &
    xvnc=$!
    wm=
    pulse=
    trap 'kill $xvnc $wm $pulse 2>/dev/null' EXIT
    # Sound (profile audio = true): a PulseAudio server with one null sink; the host reads its monitor
    # (dispo-files sound) and the viewer plays it. No source: the app gets no microphone.
    if [ "$(arg dispo.audio)" = 1 ] && command -v pulseaudio > /dev/null; then
        mkdir -p -m 0700 /tmp/dispo-pulse
        pulseaudio -n --daemonize=no --exit-idle-time=-1 --use-pid-file=no --system=no \
            --load="module-null-sink sink_name=dispo rate=48000 channels=2 sink_properties=device.description=dispo" \
            --load="module-native-protocol-unix socket=/tmp/dispo-pulse/native auth-anonymous=1" \
            --load="module-always-sink" > /tmp/dispo-pulse.log 2>&1 &
        pulse=$!
        export PULSE_SERVER=unix:/tmp/dispo-pulse/native
    fi
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
    echo $$ > /tmp/dispo-app.pid
    "$@"
    status=$?
    exit $status
    ;;
x11)
    [ "${1:-}" = "--" ] && shift
    # The app's windows on the user's desktop say they are a disposable session's: "[dispo ID] " before each
    # title, put back whenever the app changes it. The forwarding is untrusted (ssh -X), so the X server lets
    # this touch the session's own windows only, never the desktop's.
    titles=
    if command -v xdotool > /dev/null; then
        prefix="[dispo $(hostname | sed 's/^dispo-//')] "
        (
            while sleep 1; do
                for wid in $(xdotool search --onlyvisible --name . 2>/dev/null); do
                    title=$(xdotool getwindowname "$wid" 2>/dev/null) || continue
                    case "$title" in
                        "$prefix"*) ;;
                        *) xdotool set_window --name "$prefix$title" "$wid" > /dev/null 2>&1 ;;
                    esac
                done
            done
        ) &
        titles=$!
    fi
    trap 'kill $titles 2>/dev/null' EXIT
    trap 'exit 129' HUP INT TERM
    "$@"
    exit $?
    ;;
attach)
    [ "${1:-}" = "--" ] && shift
    pid=$(cat /tmp/dispo-app.pid 2>/dev/null)
    if [ -z "$pid" ] || ! kill -0 "$pid" 2>/dev/null; then
        echo "dispo-app: no app runs on the display to attach to" >&2
        exit 3
    fi
    export DISPLAY=:1
    # Chromium: straight to the running browser's process-singleton socket (dispo-open), no second browser
    # process. Otherwise (or if that fails) the command itself, which hands the URL to the running instance
    # and returns; Chromium's profile lock names the host it was taken on and the clone has a new hostname,
    # so the lock is renamed first (same pid) or it would call the profile "in use on another computer".
    if ! dispo-open "$@" 2> /dev/null; then
        lock="$HOME/.config/chromium/SingletonLock"
        if [ -L "$lock" ]; then
            held=$(readlink "$lock")
            ln -sfn "$(hostname)-${held##*-}" "$lock"
        fi
        "$@" > /dev/null 2>&1 < /dev/null
    fi
    echo "dispo-app: attached" >&2
    while kill -0 "$pid" 2>/dev/null; do sleep 0.5; done
    exit 0
    ;;
settle)
    limit=${1:-60}
    # Idle share of the CPUs over each second from /proc/stat; settled after two idle seconds in a row.
    idle_share() {
        set -- $(head -n 1 /proc/stat)
        shift
        echo $(( $1 + $2 + $3 + $4 + $5 + $6 + $7 + $8 )) $(( $4 + $5 ))
    }
    calm=0
    i=0
    set -- $(idle_share)
    total=$1 idle=$2
    while [ $i -lt "$limit" ] && [ $calm -lt 2 ]; do
        sleep 1
        i=$((i + 1))
        set -- $(idle_share)
        dt=$(( $1 - total )) di=$(( $2 - idle ))
        total=$1 idle=$2
        if [ $dt -gt 0 ] && [ $(( di * 100 / dt )) -ge 85 ]; then calm=$((calm + 1)); else calm=0; fi
    done
    echo "dispo-app: settled after $i s" >&2
    exit 0
    ;;
*)
    echo "usage: dispo-app web WxH -- CMD... | x11 -- CMD... | attach -- CMD... | settle SECONDS" >&2
    exit 2
    ;;
esac
