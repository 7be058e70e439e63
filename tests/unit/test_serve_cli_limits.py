"""`b1k-train serve` takes its limits from SecurityConfig unless a flag is given (issue 21: the CLI's own defaults
once re-enabled a 1800 s idle timeout and a 64 MiB message cap the server had dropped)."""

from __future__ import annotations

import dataclasses

from serving.security import SecurityConfig
from trainer.cli import build_parser

LIMITS = ("max_message_mb", "max_connections", "connect_wait_s", "idle_timeout_s", "max_image_side")


def test_no_flag_means_the_servers_defaults():
    args = build_parser().parse_args(["serve", "--model", "m"])
    assert {k: getattr(args, k) for k in LIMITS} == dict.fromkeys(LIMITS)
    defaults = SecurityConfig()
    assert defaults.idle_timeout_s == 0 and defaults.connect_wait_s > 0 and defaults.max_message_mb == 16.0


def test_flags_reach_the_config():
    args = build_parser().parse_args(["serve", "--model", "m", "--idle-timeout-s", "30", "--connect-wait-s", "5",
                                      "--max-connections", "3", "--max-message-mb", "8", "--max-image-side", "720"])
    cfg = SecurityConfig(**{k: getattr(args, k) for k in LIMITS})
    assert dataclasses.astuple(cfg)[2:7] == (8.0, 3, 5.0, 30.0, 720)


def test_preload_flag_matches_the_routers_modes():
    from serving.router import PRELOAD_MODES

    parser = build_parser()
    assert parser.parse_args(["serve", "--model", "m"]).preload == "auto"
    assert [parser.parse_args(["serve", "--model", "m", "--preload", m]).preload for m in PRELOAD_MODES] == \
        list(PRELOAD_MODES)
