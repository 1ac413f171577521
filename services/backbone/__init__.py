"""The backbone service: the shared middle of the model, for many clients' sessions."""
