"""Identities, certificates and TLS credentials for every splitfed party."""
