"""Tests of the agent's attract screen and local API."""
