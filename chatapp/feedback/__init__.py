"""What users wrote and rated: the SQLite store and its migrations, images, preference rows and exports.

Imports only chatapp.core (and chatapp.demo for nothing); never torch at import time.
"""
