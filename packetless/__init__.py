"""Packetless package."""

from packetless import registry_oauth

registry_oauth.defer()
