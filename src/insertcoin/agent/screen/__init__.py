"""The attract screen (QR, price, credits, state; live over SSE) and the local API
(`GET /state`, `POST /gameover`) that game software on the cabinet calls."""

from insertcoin.agent.screen.server import AgentView, Screen

__all__ = ["AgentView", "Screen"]
