"""The short-connection HTTP API (health, metrics, profiles, admin)."""
