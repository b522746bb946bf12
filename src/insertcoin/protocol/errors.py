class ProtocolError(ValueError):
    """A topic or payload that does not follow the contract; `reason` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
