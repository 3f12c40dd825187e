"""The artifact service: artifacts (bytes + signed manifest), their storage, and the device
download plane (device-bound tokens, one-time URLs, ranged downloads under server-side limits).

It does not own devices or shadows (it asks the shadow service over gRPC) nor rollouts (which
artifacts are in use is an injected question).
"""
