"""Repository-level pytest plugins: shared fixtures usable by every test module."""

pytest_plugins = ["tests.fixtures_bank"]
