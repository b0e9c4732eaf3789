"""Packetless package."""
