"""The offline demo: the synthetic shapes world and the tiny Idefics3 model trained on it.

Imports only chatapp.core.
"""
