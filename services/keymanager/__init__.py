"""The key manager: deployment CA, enrollment, renewal, revocation, session data keys."""
