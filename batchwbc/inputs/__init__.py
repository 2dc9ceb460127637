"""Where crop records come from: the slide-folder layout of a nightly run, labelled
folders and the public datasets. A new input format is a new source here.
"""
