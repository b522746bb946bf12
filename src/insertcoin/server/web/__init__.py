"""HTTP routes: seed-compatible, cabinet-authenticated, operator API, health."""
