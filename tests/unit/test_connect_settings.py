"""Connection settings for slow links: deadlines and keepalive reach the channel."""

from __future__ import annotations

import pytest

from splitfed.serving import ConnectSettings, ServerSettings
from splitfed.transport import TransportOptions


def test_keepalive_and_deadlines_are_settings() -> None:
    settings = ConnectSettings(
        address="backbone.example:50051",
        insecure=True,
        keepalive_time_s=20.0,
        keepalive_timeout_s=15.0,
        timeout_s=30.0,
        transfer_timeout_s=900.0,
    )
    options = dict(settings.options().channel_options())
    assert options["grpc.keepalive_time_ms"] == 20_000
    assert options["grpc.keepalive_timeout_ms"] == 15_000
    assert (settings.timeout_s, settings.transfer_timeout_s) == (30.0, 900.0)
    server = dict(ServerSettings(insecure=True, keepalive_time_s=20.0).options().server_options())
    # The server accepts pings as often as its clients send them (twice as often, even).
    assert server["grpc.http2.min_ping_interval_without_data_ms"] == 10_000


@pytest.mark.parametrize(
    "field", ["timeout_s", "transfer_timeout_s", "keepalive_time_s", "keepalive_timeout_s"]
)
def test_a_deadline_must_be_positive(field: str) -> None:
    with pytest.raises(ValueError, match="positive"):
        ConnectSettings(address="backbone.example:50051", insecure=True, **{field: 0.0})


def test_channels_open_a_wide_stream_window_and_servers_keep_grpcs() -> None:
    options = ConnectSettings(address="backbone.example:50051", insecure=True).options()
    assert dict(options.channel_options())["grpc.http2.lookahead_bytes"] == 4 << 20
    assert "grpc.http2.lookahead_bytes" not in dict(options.server_options())
    with pytest.raises(ValueError, match="stream_window_bytes"):
        TransportOptions(stream_window_bytes=1024)
