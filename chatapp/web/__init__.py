"""The page, the API, the admin tab, users and the server.

Uses serving, feedback and learning; never imports torch itself.
"""
