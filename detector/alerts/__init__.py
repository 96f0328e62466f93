"""Alerting: the alert lifecycle (which detection opens, updates or resolves which alert, and which change
notifies), and delivery of the notifications to the sinks."""
