"""Infrastructure every layer may use: errors, settings and limits, time, atomic files, locks.

Imports nothing else of chatapp, and neither torch nor gradio.
"""
