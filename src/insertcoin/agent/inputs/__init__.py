"""Game-over sources the agent listens to (a GPIO button; HTTP and process live elsewhere)."""
