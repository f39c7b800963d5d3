"""Bundled concept sets (YAML), loaded with :func:`conceptguard.concepts.load_concept_set`."""
