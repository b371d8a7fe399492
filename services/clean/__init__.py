"""The clean service: raw partner events in, canonical clean events out (see :mod:`.app`)."""
