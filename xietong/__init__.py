"""The ``xietong`` command-line tool: operate the network (tenants, keys), publish events, share
and subscribe. A client of the platform: it uses ``shared`` and ``schemas`` and, for
``publish --direct``, the ingest service's intake — which the library ``shared`` never does."""
