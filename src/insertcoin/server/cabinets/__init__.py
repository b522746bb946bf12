"""Cabinets: registry, credentials and presence."""
