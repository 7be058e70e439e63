"""X-VLA BEHAVIOR variant (xvla.md)."""
