"""The storage service: archives, durable insight history, private files, hybrid placement."""
