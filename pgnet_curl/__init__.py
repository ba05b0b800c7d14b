"""pg_net's SQL API on any PostgreSQL, served by an external libcurl worker."""

__version__ = "0.1.0"

# The pg_net release whose SQL contract we reproduce.
PG_NET_COMPAT_VERSION = "0.20"
