"""Ingest: how events enter the network (HTTP gateway, CLI, CDC and file-drop connectors)."""
