"""The Ray side of the request path, and the only code that imports Ray: thin Serve
deployments (:mod:`.ingress`, :mod:`.replica`), the metering actor (:mod:`.metering`) and the
application builder. The request path itself is :mod:`router.service` behind
:mod:`router.http`."""
