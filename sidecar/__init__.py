"""Webhook reliability sidecar: verify, deduplicate, forward, retry and dead-letter inbound webhooks."""

__version__ = "0.1.0"
