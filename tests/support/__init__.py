"""Helpers shared by several test packages (never imported by the product)."""
