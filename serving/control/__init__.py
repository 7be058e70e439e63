"""Inference-time control of pi-behavior (pi_behavior §4.2-4.4): chunk planning, stage voting, the correction
rules (gripper, radio), and the per-connection session that combines them."""
