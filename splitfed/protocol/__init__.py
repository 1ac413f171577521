"""The contract between the services and their callers, as Python: one module per
service (its descriptor, metadata keys, frame specs, and typed messages with
``to_proto`` / ``from_proto``), and :mod:`.framing`, the framed tensor channel both sides
of a stream use. Clients and services import this package; neither imports the other
for it."""
