"""Test configuration. The sandbox fixtures come from aiovirtstream's pytest11 entry point."""

pytest_plugins = ["pytester"]
