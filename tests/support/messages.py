"""Wire payloads as the server would publish them, for tests and benches that play it."""

from datetime import UTC, datetime, timedelta

from insertcoin.protocol import CoinPulse, dump_message


def coinpulse(
    machine_id: str, credit_id: str, *, credits: int = 1, expires_in: float = 60.0
) -> bytes:
    """A valid `coinpulse` stamped now, expiring `expires_in` seconds from now."""
    now = datetime.now(UTC)
    return dump_message(
        CoinPulse(
            machine_id=machine_id,
            credits=credits,
            timestamp=now,
            credit_id=credit_id,
            expires_at=now + timedelta(seconds=expires_in),
        )
    )
