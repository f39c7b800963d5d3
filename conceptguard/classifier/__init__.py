"""Classifiers with an explicit encoder/head split: f(x) = head(encoder(x))."""
