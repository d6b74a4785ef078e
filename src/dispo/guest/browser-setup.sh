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
if [ -d "$r/etc/firefox-esr" ]; then
    printf 'pref("intl.accept_languages", "%s", locked);\n' "$(echo "$accept" | sed 's/,/, /g')" \
        > "$r/etc/firefox-esr/dispo-session.js"
    if [ "$quiet" = 0 ]; then
        rm -f "$r/etc/firefox-esr/dispo-quiet.js" "$r/usr/share/firefox-esr/distribution/policies.json"
    elif has safe-browsing; then
        sed -i '/dispo:safe-browsing$/d' "$r/etc/firefox-esr/dispo-quiet.js"
    fi
fi
exit 0
