# Written by dispo (quiet browser, docs/quiet.md). The chromium wrapper sources every file here in name
# order, after Debian's `apikeys`: without Google API keys Chromium has no Google service to talk to
# (sign-in, sync, GCM push, the geolocation and translate APIs), whatever a policy forgets.
unset GOOGLE_API_KEY GOOGLE_DEFAULT_CLIENT_ID GOOGLE_DEFAULT_CLIENT_SECRET
# What no policy covers: background requests (variations, GCM), component updates (the policy exempts
# security-related ones: CRLSet and others from update.googleapis.com), the crash reporter, the field-trial
# config, and the "pings" of <a ping> (a page's own tracking).
# --gaia-url: Chromium lists the Google accounts in its cookie jar (accounts.google.com/ListAccounts) as soon
# as a profile's network is up, whether sign-in is allowed or not; pointed at the guest's own loopback, that
# internal call fails at once and nothing leaves the guest. Pages still reach accounts.google.com as usual.
# --component-updater=url-source=...: the component updater still asks update.googleapis.com for components
# installed "on demand" (the on-device AI models' manifest), which neither the policy nor
# --disable-component-update stops; pointed at the guest's loopback, it fails there, like --gaia-url.
# No --no-first-run: the first run is what applies the initial preferences (the accepted languages).
# --ipc-connection-timeout: a child process (the network service first) kills itself when the browser has not
# connected to it within 15 s, which an emulated guest (arm64 under TCG) misses: the first page's navigation
# then dies with it. Two minutes is enough there and changes nothing for a guest that keeps up.
export CHROMIUM_FLAGS="$CHROMIUM_FLAGS --ipc-connection-timeout=120 --disable-background-networking --disable-component-update --disable-breakpad --disable-domain-reliability --disable-field-trial-config --no-pings --no-default-browser-check --gaia-url=http://127.0.0.1:9 --component-updater=url-source=http://127.0.0.1:9"
