"""The request path as plain Python (no Ray, no HTTP): admission and routing
(:mod:`.completions`, :mod:`.routing`, :mod:`.carbon`), the bill (:mod:`.settlement`),
remote servers' metering (:mod:`.proxied`), deferred work (:mod:`.deferral`, :mod:`.batches`),
assembled by :class:`router.service.app.RouterService`. Its seams are typed in :mod:`.ports`,
with fakes in :mod:`.fakes`."""
