"""Generated protobuf and gRPC stubs for package splitfed.v1 (see protos/). Do not edit."""
