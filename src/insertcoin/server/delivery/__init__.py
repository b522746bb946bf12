"""Credit delivery: the grant outbox, the dispatcher that publishes it, the listener for
what cabinets say back."""
