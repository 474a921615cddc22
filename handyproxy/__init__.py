"""HandyProxy: a transparent TCP forwarder turning REDIRECTed connections into CONNECT tunnels."""

__version__ = "1.0.0"
