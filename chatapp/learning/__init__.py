"""Turning feedback into adapters: trainer, recipes, gate, registry, background watcher, A/B.

Uses chatapp.serving (sampling) and chatapp.feedback; never chatapp.web.
"""
