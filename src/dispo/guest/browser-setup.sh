#!/bin/sh
# dispo-browser-setup: per-session browser settings, run as root by the guest's init before anything else
# starts (docs/quiet.md). The image carries the quiet settings; this applies what the session asked for:
#   dispo-browser-setup LANG QUIET ALLOW
#     LANG   the language the browser asks pages for (BCP 47, e.g. de-DE), following the host or the profile
#     QUIET  0 to drop the quiet settings altogether (a benchmark's baseline; profile `quiet = false`)
#     ALLOW  comma-separated quiet settings the profile turned back on: safe-browsing
# DISPO_SETUP_ROOT: a tree to work on instead of / (the tests run this script on a copy of the files).
set -u
lang=${1:-en-US} quiet=${2:-1} allow=${3:-}
r=${DISPO_SETUP_ROOT:-}
# The session's other choices are kernel arguments (DISPO_CMDLINE: the tests' stand-in for /proc/cmdline).
cmdline=${DISPO_CMDLINE:-$(cat /proc/cmdline)}
arg() {
    for w in $cmdline; do
        case "$w" in "$1="*) echo "${w#*=}"; return 0 ;; esac
    done
    return 0
}
downloads=$(arg dispo.downloads)
keep=$(arg dispo.keep)
home="$r/home/user"
# Only letters and dashes reach a file (dispo checks this too; the guest's own copy must not trust it).
case "$lang" in ''|*[!A-Za-z0-9-]*|-*) lang=en-US ;; esac
primary=${lang%%-*}
accept=$lang
[ "$primary" != "$lang" ] && accept="$lang,$primary"

# The app's environment (dispo-app exports it): its language (de-DE -> de_DE.UTF-8), and for a quiet Firefox
# the switch without which a release build ignores its Remote Settings server preference (firefox-prefs.js).
mkdir -p "$r/run/dispo"
{
    echo "LANG=$(echo "$lang" | tr - _).UTF-8"
    echo "LANGUAGE=$(echo "$lang" | tr - _):$primary"
    if [ -d "$r/etc/firefox-esr" ] && [ "$quiet" != 0 ]; then
        echo "MOZ_REMOTE_SETTINGS_DEVTOOLS=1"
    fi
} > "$r/run/dispo/session.env"

has() { case ",$allow," in *",$1,"*) return 0 ;; esac; return 1; }

if [ -d "$r/etc/chromium" ]; then
    # Initial preferences seed each new browser profile (every session's is new): the accepted languages.
    sed "s/@ACCEPT_LANGUAGES@/$accept/g" "$r/usr/lib/dispo/chromium-initial-preferences.json" \
        > "$r/etc/chromium/master_preferences"
    if [ "$quiet" = 0 ]; then
        rm -f "$r/etc/chromium/policies/managed/dispo-quiet.json" "$r/etc/chromium.d/dispo-quiet"
    elif has safe-browsing; then
        sed -i 's/"SafeBrowsingProtectionLevel": 0/"SafeBrowsingProtectionLevel": 1/' \
            "$r/etc/chromium/policies/managed/dispo-quiet.json"
    fi
fi
if [ -d "$r/etc/chromium" ] && [ "$downloads" = 0 ]; then
    # The profile turned downloads off: the browser refuses every one.
    mkdir -p "$r/etc/chromium/policies/managed"
    echo '{"DownloadRestrictions": 3}' > "$r/etc/chromium/policies/managed/dispo-session.json"
fi
if [ -d "$r/etc/firefox-esr" ]; then
    printf 'pref("intl.accept_languages", "%s", locked);\n' "$(echo "$accept" | sed 's/,/, /g')" \
        > "$r/etc/firefox-esr/dispo-session.js"
    if [ "$downloads" = 0 ]; then
        # Firefox has no policy that refuses downloads: they go to a directory the user cannot write.
        mkdir -p "$home/.no-downloads"
        chmod 0555 "$home/.no-downloads"
        printf '%s\n' 'pref("browser.download.dir", "/home/user/.no-downloads", locked);' \
            'pref("browser.download.folderList", 2, locked);' 'pref("browser.download.useDownloadDir", true, locked);' \
            >> "$r/etc/firefox-esr/dispo-session.js"
    fi
    if [ "$quiet" = 0 ]; then
        rm -f "$r/etc/firefox-esr/dispo-quiet.js" "$r/usr/share/firefox-esr/distribution/policies.json"
    elif has safe-browsing; then
        sed -i '/dispo:safe-browsing$/d' "$r/etc/firefox-esr/dispo-quiet.js"
    fi
fi

# A kept volume (dispo run --keep NAME): the disk labelled dispo-keep, mounted over the app's profile directory
# (a path below the user's home, e.g. .config/chromium), so the profile outlives the session.
case "$keep" in *..*|/*|*[!A-Za-z0-9._/-]*) keep= ;; esac
if [ -n "$keep" ]; then
    d=$home
    for part in $(echo "$keep" | tr / ' '); do
        d="$d/$part"
        [ -d "$d" ] || { mkdir "$d" && chown 1000:1000 "$d"; }
    done
    if [ -z "$r" ]; then
        mount -o nosuid,nodev,noexec LABEL=dispo-keep "$d" || echo "dispo-browser-setup: the kept volume did not mount"
    fi
    chown 1000:1000 "$d"
    # One session at a time uses a volume (the host locks it), so a browser's profile lock found here is a past
    # session's, taken under another hostname: Chromium would call the profile "in use on another computer".
    # No user process runs yet, and find does not follow links.
    find "$d" -maxdepth 3 \( -name 'Singleton*' -o -name lock -o -name .parentlock \) -exec rm -f {} + 2>/dev/null
fi
exit 0
