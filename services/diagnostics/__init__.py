"""The Diagnostics service: link checks and the tensor path end to end."""

from splitfed.services.diagnostics.servicer import DiagnosticsServicer, binding

__all__ = ["DiagnosticsServicer", "binding"]
