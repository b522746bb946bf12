"""Experiment only (`bench.delivery --nodelay` puts this folder on PYTHONPATH of the server
and the acker): set TCP_NODELAY on every TCP connection the process opens — paho's MQTT
socket among them — to show what Nagle's algorithm costs without touching src/."""

import socket

_create_connection = socket.create_connection


def _create_connection_nodelay(*args, **kwargs):  # type: ignore[no-untyped-def]
    sock = _create_connection(*args, **kwargs)
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


socket.create_connection = _create_connection_nodelay
