"""Copies of the legacy server's own tests (CIRWEL/unitares, Apache-2.0), run against the drop-ins."""
