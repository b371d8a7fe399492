"""The contracts of the platform: pydantic models (the source of truth), the JSON Schema files
and the AsyncAPI 3 document generated from them (``python -m schemas.generate``)."""
