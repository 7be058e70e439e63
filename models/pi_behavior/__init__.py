"""pi-behavior: the 1st-place BEHAVIOR 2025 policy (a Pi0.5 variant)."""
