"""Signed webhooks from a durable outbox: at-least-once, retried with backoff and jitter."""

from mediaserver.webhooks.outbox import Outbox, WebhookSender
from mediaserver.webhooks.signing import SIGNATURE_HEADER, sign, verify

__all__ = ["SIGNATURE_HEADER", "Outbox", "WebhookSender", "sign", "verify"]
