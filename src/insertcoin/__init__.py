"""insertcoin: card and phone payments for arcade cabinets, credited exactly once."""

__version__ = "0.1.0"
