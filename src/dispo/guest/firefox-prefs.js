// Written by dispo (quiet browser, docs/quiet.md): what Firefox's enterprise policies (policies.json) do not
// cover, as Debian's system preferences (every file in /etc/firefox-esr is read). All locked: an unlocked
// default set here may be replaced by Firefox's own defaults, read later, and a locked one cannot be changed
// by the page or in the settings either. Lines marked "dispo:safe-browsing" are removed at boot when the
// profile sets safe_browsing = true (Firefox's own defaults then apply).

// The first run: no privacy-notice tab, welcome page, "what's new" page or terms-of-use prompt.
pref("datareporting.policy.firstRunURL", "", locked);
pref("datareporting.policy.dataSubmissionEnabled", false, locked);
pref("datareporting.healthreport.uploadEnabled", false, locked);
pref("browser.aboutwelcome.enabled", false, locked);
pref("browser.startup.homepage_override.mstone", "ignore", locked);
pref("startup.homepage_welcome_url", "", locked);
pref("startup.homepage_welcome_url.additional", "", locked);
pref("browser.shell.checkDefaultBrowser", false, locked);
pref("trailhead.firstrun.didSeeAboutWelcome", true, locked);
pref("termsofuse.bypassNotification", true, locked);
pref("browser.preonboarding.enabled", false, locked);
pref("browser.startup.page", 0, locked);
pref("browser.newtabpage.enabled", false, locked);

// Connectivity and captive-portal probes, DNS over HTTPS and its canary lookups.
pref("network.captive-portal-service.enabled", false, locked);
pref("network.connectivity-service.enabled", false, locked);
pref("captivedetect.canonicalURL", "", locked);
pref("network.trr.mode", 5, locked);
pref("doh-rollout.enabled", false, locked);
pref("doh-rollout.disable-heuristics", true, locked);

// Speculative connections, DNS prefetching and link prefetch: a request before the user asks.
pref("network.dns.disablePrefetch", true, locked);
pref("network.dns.disablePrefetchFromHTTPS", true, locked);
pref("network.prefetch-next", false, locked);
pref("network.predictor.enabled", false, locked);
pref("network.http.speculative-parallel-limit", 0, locked);
pref("browser.places.speculativeConnect.enabled", false, locked);
pref("browser.urlbar.speculativeConnect.enabled", false, locked);

// Telemetry, studies, experiments, crash and coverage reports.
pref("toolkit.telemetry.enabled", false, locked);
pref("toolkit.telemetry.unified", false, locked);
pref("toolkit.telemetry.archive.enabled", false, locked);
pref("toolkit.telemetry.server", "", locked);
pref("toolkit.coverage.opt-out", true, locked);
pref("toolkit.coverage.endpoint.base", "", locked);
pref("app.normandy.enabled", false, locked);
pref("app.normandy.api_url", "", locked);
pref("app.shield.optoutstudies.enabled", false, locked);
pref("messaging-system.rsexperimentloader.enabled", false, locked);
pref("nimbus.telemetry.targetingContextEnabled", false, locked);
pref("browser.ping-centre.telemetry", false, locked);
pref("browser.newtabpage.activity-stream.feeds.telemetry", false, locked);
pref("browser.newtabpage.activity-stream.telemetry", false, locked);
pref("browser.tabs.crashReporting.sendReport", false, locked);
pref("breakpad.reportURL", "", locked);
pref("dom.private-attribution.submission.enabled", false, locked);

// Remote settings (blocklists, experiments, search config, CRLite, translations' models): a dead server.
// A release build takes this only with MOZ_REMOTE_SETTINGS_DEVTOOLS=1 in its environment, which
// browser-setup.sh puts in the session's environment (dispo-app starts the browser with it).
pref("services.settings.server", "data:,#remote-settings-dummy/v1", locked);
pref("security.remote_settings.crlite_filters.enabled", false, locked);
pref("security.remote_settings.intermediates.enabled", false, locked);
pref("extensions.blocklist.enabled", false, locked);
pref("browser.translations.enable", false, locked);
pref("browser.ml.enable", false, locked);

// Add-on, plugin (OpenH264, Widevine) and search-engine updates, region and geolocation lookups.
pref("extensions.update.enabled", false, locked);
pref("extensions.getAddons.cache.enabled", false, locked);
pref("extensions.systemAddon.update.enabled", false, locked);
pref("media.gmp-manager.url", "data:text/plain,", locked);
pref("media.gmp-gmpopenh264.enabled", false, locked);
pref("media.gmp-gmpopenh264.autoupdate", false, locked);
pref("media.gmp-widevinecdm.enabled", false, locked);
pref("media.gmp-widevinecdm.autoupdate", false, locked);
pref("media.gmp-widevinecdm.visible", false, locked);
// Widevine comes from Google's component updater (update.googleapis.com), asked even with EME off.
pref("media.gmp-manager.chromium-update-url", "data:text/plain,", locked);
pref("media.gmp-provider.enabled", false, locked);
pref("browser.search.update", false, locked);
pref("browser.region.network.url", "", locked);
pref("browser.region.update.enabled", false, locked);
pref("geo.provider.network.url", "", locked);
pref("geo.enabled", false, locked);

// Web push (a standing connection to Mozilla's push service), accounts, new-tab and urlbar content.
pref("dom.push.enabled", false, locked);
pref("dom.push.connection.enabled", false, locked);
pref("identity.fxaccounts.enabled", false, locked);
pref("browser.topsites.contile.enabled", false, locked);
pref("browser.newtabpage.activity-stream.feeds.topsites", false, locked);
pref("browser.newtabpage.activity-stream.showSponsored", false, locked);
pref("browser.newtabpage.activity-stream.showSponsoredTopSites", false, locked);
pref("browser.urlbar.quicksuggest.enabled", false, locked);
pref("browser.urlbar.suggest.searches", false, locked);
pref("browser.discovery.enabled", false, locked);
pref("browser.uitour.enabled", false, locked);
pref("browser.vpn_promo.enabled", false, locked);
pref("extensions.pocket.enabled", false, locked);
pref("signon.management.page.breach-alerts.enabled", false, locked);
pref("browser.contentblocking.report.monitor.enabled", false, locked);

// OCSP: a request to the certificate's authority on every new https site (Chromium does none).
pref("security.OCSP.enabled", 0, locked);

// Safe browsing and tracking-protection list downloads (a profile may turn these back on).
pref("browser.safebrowsing.malware.enabled", false, locked); // dispo:safe-browsing
pref("browser.safebrowsing.phishing.enabled", false, locked); // dispo:safe-browsing
pref("browser.safebrowsing.blockedURIs.enabled", false, locked); // dispo:safe-browsing
pref("browser.safebrowsing.downloads.enabled", false, locked); // dispo:safe-browsing
pref("browser.safebrowsing.downloads.remote.enabled", false, locked); // dispo:safe-browsing
pref("browser.safebrowsing.provider.google4.updateURL", "", locked); // dispo:safe-browsing
pref("browser.safebrowsing.provider.google4.gethashURL", "", locked); // dispo:safe-browsing
pref("browser.safebrowsing.provider.google.updateURL", "", locked); // dispo:safe-browsing
pref("browser.safebrowsing.provider.google.gethashURL", "", locked); // dispo:safe-browsing
pref("browser.safebrowsing.provider.mozilla.updateURL", "", locked); // dispo:safe-browsing
pref("browser.safebrowsing.provider.mozilla.gethashURL", "", locked); // dispo:safe-browsing
