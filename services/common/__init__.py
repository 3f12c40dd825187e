"""Pieces every service shares: settings parsing, database engines and migrations, gRPC wiring."""
