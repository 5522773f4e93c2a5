"""Shared test helpers: paths, ports, servers, raw HTTP, browser flags, page harnesses."""
