"""The notifier: pushes notifications to principals over server-sent events and signed webhooks."""
