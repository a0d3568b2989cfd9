"""The wire format's internals: the safe pickle VM and its numpy side (binary_protocol.py is the public face)."""
