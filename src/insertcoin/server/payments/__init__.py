"""Payments: Stripe Checkout, webhooks, capture and refunds."""
