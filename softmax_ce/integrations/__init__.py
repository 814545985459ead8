"""Integrations with other libraries; each is imported on demand and its library is optional."""
