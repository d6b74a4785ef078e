#!/bin/sh
# dispo-files: the session's downloads, uploads, clipboard and sound, for the host. dispo runs it over the
# session's SSH as the unprivileged user (runtime/guestio.py); the host checks every answer again, since the
# guest is not trusted.
#   dispo-files list            each regular file in ~/Downloads as "SIZE/NAME\0" (a name has no '/')
#   dispo-files get NAME        the bytes of ~/Downloads/NAME (a regular file, not a link)
#   dispo-files put NAME [SIZE] stdin into ~/Uploads/NAME (or "N-NAME" if taken); prints the name used. With SIZE,
#                               a file of another size (an upload the host stopped) is removed, not kept
#   dispo-files clip-get        the X clipboard (CLIPBOARD selection) of the session's display :1
#   dispo-files clip-set        stdin becomes the X clipboard (and PRIMARY) of :1
#   dispo-files sound           the session's sound (PulseAudio's null sink) as raw s16le 48 kHz stereo
set -u
export LC_ALL=C DISPLAY=:1 PULSE_SERVER=unix:/tmp/dispo-pulse/native
dl="$HOME/Downloads"
up="$HOME/Uploads"

name_ok() {
    case "$1" in ''|.|..|*/*) echo "dispo-files: bad name" >&2; exit 2 ;; esac
}

case "${1:-}" in
list)
    [ -d "$dl" ] || exit 0
    exec find "$dl" -mindepth 1 -maxdepth 1 -type f -printf '%s/%f\0'
    ;;
get)
    name_ok "${2:-}"
    f="$dl/$2"
    if [ -L "$f" ] || [ ! -f "$f" ]; then echo "dispo-files: no such download" >&2; exit 3; fi
    exec cat -- "$f"
    ;;
put)
    name_ok "${2:-}"
    mkdir -p "$up" || exit 1
    tmp=$(mktemp "$up/.dispo-upload.XXXXXX") || exit 1
    if ! cat > "$tmp"; then rm -f "$tmp"; exit 1; fi
    if [ -n "${3:-}" ] && [ "$(wc -c < "$tmp")" -ne "$3" ]; then
        rm -f "$tmp"; echo "dispo-files: the upload ended early" >&2; exit 1
    fi
    target=$2
    n=1
    while [ -e "$up/$target" ] || [ -L "$up/$target" ]; do target="$n-$2"; n=$((n + 1)); done
    chmod 0644 "$tmp"
    mv -- "$tmp" "$up/$target" || { rm -f "$tmp"; exit 1; }
    printf '%s' "$target"
    ;;
clip-get)
    # Nothing on the clipboard is not an error: an empty answer.
    timeout 5 xclip -selection clipboard -o 2>/dev/null
    exit 0
    ;;
clip-set)
    tmp=$(mktemp) || exit 1
    cat > "$tmp"
    # xclip serves the selection from a process of its own until someone else takes it; its output is closed
    # so this SSH command returns.
    xclip -selection primary -i "$tmp" > /dev/null 2>&1 < /dev/null
    xclip -selection clipboard -i "$tmp" > /dev/null 2>&1 < /dev/null
    status=$?
    rm -f "$tmp"
    exit $status
    ;;
sound)
    exec parec --device=dispo.monitor --format=s16le --rate=48000 --channels=2 --latency-msec=20 --raw
    ;;
*)
    echo "usage: dispo-files list | get NAME | put NAME | clip-get | clip-set | sound" >&2
    exit 2
    ;;
esac
