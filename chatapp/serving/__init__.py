"""Generation: the model engine and hot-swapping adapters into it.

Never imports gradio, nor chatapp.web or chatapp.learning.
"""
