"""The contract of splitfed.v1.Diagnostics (protos/splitfed/v1/diagnostics.proto): the
service and the frame specs of its echo stream."""

from __future__ import annotations

from splitfed.v1 import diagnostics_pb2
from splitfed.wire import FrameSpec

SERVICE = diagnostics_pb2.DESCRIPTOR.services_by_name["Diagnostics"]
SERVICE_NAME = SERVICE.full_name
REQUEST_FRAMES = FrameSpec(diagnostics_pb2.EchoTensorsRequest)
RESPONSE_FRAMES = FrameSpec(diagnostics_pb2.EchoTensorsResponse)
