"""Fixtures shared by every test file (defined in their own modules, re-exported here)."""

from tests.smtp_server import smtp_server, tls_files

__all__ = ["smtp_server", "tls_files"]
