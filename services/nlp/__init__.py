"""The nlp service: text documents in, redacted text insights out."""
